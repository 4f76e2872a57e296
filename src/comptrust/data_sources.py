"""Where perspective data comes from: the built-in mini suites, a DecodingTrust data folder, or the Hub.

Every source ends up as a local folder in DecodingTrust's ``data/`` layout, so perspectives have one loader.
"""

from __future__ import annotations

import os
from pathlib import Path

from comptrust.errors import UsageError

MINI_DIR = Path(__file__).parent / "suites" / "mini"
DT_HUB_ID = "AI-Secure/DecodingTrust"


def mini_dir() -> Path:
    return MINI_DIR


def dt_dir(data_dir: str | None) -> Path:
    """--data-dir: a local DecodingTrust data folder, or hf:AI-Secure/DecodingTrust (downloaded to the HF cache)."""
    spec = data_dir or os.environ.get("COMPTRUST_DT_DATA")
    if not spec:
        raise UsageError(
            "--suite dt needs --data-dir: a DecodingTrust data folder (e.g. ../shared/data/decodingtrust) "
            f"or hf:{DT_HUB_ID}"
        )
    if spec.startswith("hf:"):
        return _from_hub(spec[3:])
    p = Path(spec).expanduser()
    if not p.is_dir():
        raise UsageError(f"--data-dir {spec}: no such directory")
    return p


def _from_hub(repo: str) -> Path:
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo_id=repo, repo_type="dataset"))
    except Exception as e:
        msg = (str(e).splitlines() or [type(e).__name__])[0][:200]
        raise UsageError(
            f"cannot get dataset '{repo}' from the Hugging Face Hub: {type(e).__name__}: {msg}; "
            "pass a local DecodingTrust data folder with --data-dir"
        ) from None


def mmlu_dir(mmlu: str | None, data_dir: Path) -> Path | None:
    """--mmlu-dir, else <data_dir>/mmlu, else a 'mmlu' folder next to the DecodingTrust folder."""
    if mmlu:
        if mmlu.startswith("hf:"):
            return Path(mmlu)  # the MMLU perspective resolves hf: ids itself
        p = Path(mmlu).expanduser()
        if not p.is_dir():
            raise UsageError(f"--mmlu-dir {mmlu}: no such directory")
        return p
    for cand in (data_dir / "mmlu", data_dir.parent / "mmlu"):
        if cand.is_dir():
            return cand
    return None
