"""Generation engines: batch-first (prompts in, generations out, same order), plus the store-backed cache."""

from comptrust.engine.base import Engine, Generation
from comptrust.engine.cached import CachedEngine, GenerationStats

__all__ = ["Engine", "Generation", "CachedEngine", "GenerationStats"]
