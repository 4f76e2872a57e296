"""Where comptrust keeps caches: $COMPTRUST_HOME (default ~/.cache/comptrust)."""

import os
from pathlib import Path


def home() -> Path:
    p = Path(os.environ.get("COMPTRUST_HOME") or Path.home() / ".cache" / "comptrust").expanduser()
    try:
        p.mkdir(parents=True, exist_ok=True)
    except OSError as e:  # a file in the way, no permission: one line naming the variable, not a traceback
        from comptrust.errors import UsageError

        raise UsageError(f"COMPTRUST_HOME={p}: cannot create comptrust's cache folder there ({e.strerror}); "
                         "set COMPTRUST_HOME to a writable folder") from None
    return p


def models_cache() -> Path:
    p = home() / "models"
    p.mkdir(parents=True, exist_ok=True)
    return p
