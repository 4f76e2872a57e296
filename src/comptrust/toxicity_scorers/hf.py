"""A Hugging Face sequence-classification model as a toxicity scorer (`hf:MODEL[#LABEL]`)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from comptrust.errors import UsageError
from comptrust.toxicity_scorers.base import _scorable

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def _first_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return (text[:300] + "...") if len(text) > 300 else text or type(e).__name__


class HFClassifierScorer:
    """A Hugging Face sequence-classification model: the probability of its "toxic" label.

    spec: a Hub id (org/name[@revision]) or a local directory, optionally followed by #LABEL (a label name or
    index) when the label cannot be found by name. Without #LABEL the label named "toxic"/"toxicity" is used (or
    the one label containing "toxic" that is not "non-toxic"); a two-label model with the generic names
    LABEL_0/LABEL_1 uses label 1. Sigmoid for multi-label models (config.problem_type), softmax otherwise.
    Texts are batched by length, truncated to the model's length limit (at most max_length tokens), on CUDA when
    present.
    """

    def __init__(self, spec: str, batch_size: int = 32, device: str | None = None, max_length: int = 512):
        if not spec or not spec.strip():
            raise UsageError("hf: needs a model, e.g. hf:unitary/toxic-bert or hf:path/to/model-dir")
        self.spec = spec.strip()
        self.name = f"hf:{self.spec}"
        model, _, label = self.spec.partition("#")
        self.model_ref, self.label_spec = model, (label or None)
        self.batch_size = batch_size
        self.device_arg = device
        self.max_length = max_length
        self._loaded: tuple[Any, Any, int, bool, str, int] | None = None
        self._load()  # fail now (bad id, offline, no toxic label), not after an evaluation's generations

    def _load(self) -> tuple[Any, Any, int, bool, str, int]:
        """(tokenizer, model, label index, sigmoid?, device, max tokens), loaded once."""
        if self._loaded is not None:
            return self._loaded
        try:
            import torch
            from transformers import AutoModelForSequenceClassification, AutoTokenizer
        except ImportError as e:
            raise UsageError(f"the '{self.name}' toxicity scorer needs torch and transformers ({e})") from None
        ref = self.model_ref
        local = Path(ref).expanduser()
        # the rules of --model apply to every model comptrust loads: safetensors only (a pytorch_model.bin would be
        # handed to torch's unpickler) and never the checkpoint's own Python code
        kwargs: dict[str, Any] = {"use_safetensors": True, "trust_remote_code": False}
        if local.is_dir():
            from comptrust.models.resolve import check_loadable_dir

            try:
                check_loadable_dir(local, "AutoModelForSequenceClassification")
            except UsageError as e:
                raise UsageError(f"{self.name}: {e}") from None
            src = str(local)
        else:
            repo, _, rev = ref.partition("@")
            if local.exists() or not _HUB_ID.match(repo):
                raise UsageError(f"{self.name}: '{ref}' is neither a model directory nor a Hub id org/name[@revision]")
            src = repo
            if rev:
                kwargs["revision"] = rev
        try:
            tok = AutoTokenizer.from_pretrained(src, **{k: v for k, v in kwargs.items() if k != "use_safetensors"})
            model = AutoModelForSequenceClassification.from_pretrained(src, **kwargs)
        except Exception as e:  # noqa: BLE001 - hub/offline/format errors come in many types; all mean "cannot load"
            hint = (
                "" if local.is_dir() else
                f"; with no network, download it first (huggingface-cli download {src}) and pass its directory"
            )
            raise UsageError(f"{self.name}: cannot load the model ({_first_line(e)}){hint}") from None
        id2label = {int(k): str(v) for k, v in (model.config.id2label or {}).items()}
        idx = self._label_index(id2label)
        sigmoid = getattr(model.config, "problem_type", None) == "multi_label_classification" or len(id2label) == 1
        device = self.device_arg or ("cuda" if torch.cuda.is_available() else "cpu")
        if device.startswith("cuda") and torch.cuda.is_available() and torch.cuda.is_bf16_supported():
            model = model.to(dtype=torch.bfloat16)
        model = model.to(device).eval()
        limit = self.max_length
        mml = getattr(tok, "model_max_length", None)
        if isinstance(mml, int) and 0 < mml < limit:
            limit = mml
        mpe = getattr(model.config, "max_position_embeddings", None)
        if isinstance(mpe, int) and mpe > 2:
            limit = min(limit, mpe - 2)  # RoBERTa-style models offset positions by 2; 2 tokens fewer harm none
        self._loaded = (tok, model, idx, sigmoid, device, limit)
        return self._loaded

    def _label_index(self, id2label: dict[int, str]) -> int:
        labels = ", ".join(f"{i}={n}" for i, n in sorted(id2label.items()))
        if self.label_spec is not None:
            if self.label_spec.isdigit() and int(self.label_spec) in id2label:
                return int(self.label_spec)
            hit = [i for i, n in id2label.items() if n.lower() == self.label_spec.lower()]
            if hit:
                return hit[0]
            raise UsageError(f"{self.name}: the model has no label '{self.label_spec}' (labels: {labels})")
        names = {i: n.lower().replace("-", "_").replace(" ", "_") for i, n in id2label.items()}
        exact = [i for i, n in names.items() if n in ("toxic", "toxicity", "is_toxic")]
        if len(exact) == 1:
            return exact[0]
        partial = [
            i for i, n in names.items()
            if "toxic" in n and not n.startswith(("non", "not", "no_", "severe", "very"))
        ]  # fmt: skip
        if len(partial) == 1:
            return partial[0]
        if sorted(names.values()) == ["label_0", "label_1"]:
            return 1  # the usual convention for a binary classifier: label 1 = the positive (toxic) class
        raise UsageError(f"{self.name}: cannot tell which label is 'toxic' (labels: {labels}); add #LABEL to the name")

    def score(self, texts: list[str]) -> list[float | None]:
        out: list[float | None] = [None] * len(texts)
        todo = _scorable(texts)
        if not todo:
            return out
        import torch

        tok, model, idx, sigmoid, device, limit = self._load()
        order = sorted(todo, key=lambda i: len(texts[i]))
        for start in range(0, len(order), self.batch_size):
            chunk = order[start : start + self.batch_size]
            enc = tok([texts[i] for i in chunk], padding=True, truncation=True, max_length=limit, return_tensors="pt")
            enc = {k: v.to(device) for k, v in enc.items()}
            with torch.inference_mode():
                logits = model(**enc).logits.float()
            probs = torch.sigmoid(logits) if sigmoid else torch.softmax(logits, dim=-1)
            for i, p in zip(chunk, probs[:, idx].tolist()):
                out[i] = float(p)
        return out
