"""Prompts as a model sees them: the tokenizer, the rendered text, its token ids and the cache fingerprint.

Shared by the HF and vLLM backends, so both send the same text and tokens and share cache keys.
"""

from __future__ import annotations

from comptrust.errors import UsageError
from comptrust.models.resolve import ResolvedModel
from comptrust.types import Prompt


def load_tokenizer(model: ResolvedModel, chat: bool | None):
    """The model's tokenizer, left-padding, a pad token; and whether prompts get its chat template."""
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(model.path))
    except Exception as e:
        raise UsageError(f"cannot load the tokenizer of {model.path}: {type(e).__name__}: {e}") from None
    tok.padding_side = "left"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    use_chat = bool(tok.chat_template) if chat is None else chat
    if use_chat and not tok.chat_template:
        raise UsageError(f"{model.name} has no chat template; evaluate it in raw-text mode (--raw)")
    return tok, use_chat


def render_prompt(tok, chat: bool, prompt: Prompt) -> str:
    """The exact text the model sees: the chat template, or for raw-text mode (base models) the turns
    separated by blank lines with the assistant's turn left open; raw prompts (MMLU) as they are."""
    if prompt.raw is not None:
        return prompt.raw
    msgs = [{"role": m.role, "content": m.content} for m in prompt.messages]
    if chat:  # the model folder's template is untrusted code: sandboxed and bounded (engine/chat_template.py)
        from comptrust.engine.chat_template import render_chat

        return render_chat(tok, msgs, getattr(tok, "name_or_path", "the model"))
    return "\n\n".join(m["content"] for m in msgs) + "\n"


def encode_prompt(tok, chat: bool, prompt: Prompt) -> list[int]:
    """Token ids of the rendered prompt: the chat template carries its own special tokens; raw text gets the
    tokenizer's (BOS)."""
    return tok(render_prompt(tok, chat, prompt), add_special_tokens=prompt.raw is not None)["input_ids"]


def fingerprint_for(model: ResolvedModel, dtype: str, chat: bool) -> str:
    """What changes outputs besides the weights: dtype and the prompt rendering mode. Part of every cache key."""
    return f"{model.fingerprint}:{dtype}:{'chat' if chat else 'raw'}"

