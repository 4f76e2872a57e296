"""Model resolution: --model value -> a local Hugging Face directory with a content fingerprint."""

from comptrust.models.resolve import ResolvedModel, resolve

__all__ = ["ResolvedModel", "resolve"]
