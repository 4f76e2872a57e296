"""Where comptrust keeps caches: $COMPTRUST_HOME (default ~/.cache/comptrust)."""

import os
from pathlib import Path


def home() -> Path:
    p = Path(os.environ.get("COMPTRUST_HOME") or Path.home() / ".cache" / "comptrust")
    p.mkdir(parents=True, exist_ok=True)
    return p


def models_cache() -> Path:
    p = home() / "models"
    p.mkdir(parents=True, exist_ok=True)
    return p
