"""A cache in front of any engine, backed by the results directory's SQLite store.

Deduplicates identical requests (same rendered prompt and decoding parameters) before generating, sorts the
misses by length so batches pad little, and commits every chunk in its own transaction: a killed run loses
at most one chunk, and a rerun generates only what was never committed.

Chunks are cut from the misses in a deterministic order and commit whole, so after a crash the rerun's misses
are exactly the chunks that never committed, cut the same way: the engine sees the same batches as an
uninterrupted run, and greedy outputs (hence scores) come out identical (tests/study/test_crash.py).
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

from comptrust.engine.base import Engine, Generation
from comptrust.store import Store, generation_key
from comptrust.types import Prompt


@dataclass
class GenerationStats:
    requests: int = 0
    unique: int = 0
    cache_hits: int = 0
    generated: int = 0  # prompts generated now
    new_tokens: int = 0
    seconds: float = 0.0
    engine_load_seconds: float = 0.0
    extra: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        d = self.__dict__.copy()
        d["tokens_per_s"] = round(self.new_tokens / self.seconds, 1) if self.seconds else None
        return d


DEFAULT_CHUNK_SIZE = 128


def chunk_size_for(engine: Engine, explicit: int | None = None) -> int:
    """Prompts per engine call (and per committed transaction): the explicit value, else COMPTRUST_CHUNK_SIZE,
    else the engine's own `chunk_size` attribute, else 128.

    Why the engine decides by default: one transaction per chunk means a smaller chunk loses less to a crash,
    but an engine can only batch what one call hands it; a GPU engine (hf.py: 1,024 prompts on CUDA; vLLM 4,096)
    needs chunks large enough to fill the batches its memory allows. The environment variable stays the override
    (the crash tests use it to get several chunks per model). The cut itself depends only on this number and the
    sorted misses, so a resumed run cuts the same chunks as an uninterrupted one."""
    if explicit:
        return int(explicit)
    env = os.environ.get("COMPTRUST_CHUNK_SIZE")
    if env:
        return int(env)
    own = getattr(engine, "chunk_size", None)
    if isinstance(own, int) and not isinstance(own, bool) and own > 0:
        return own
    return DEFAULT_CHUNK_SIZE


class CachedEngine:
    def __init__(self, engine: Engine, store: Store, chunk_size: int | None = None):
        self.engine = engine
        self.store = store
        self.chunk_size = chunk_size_for(engine, chunk_size)
        self.stats = GenerationStats()

    def generate(
        self,
        prompts: Sequence[Prompt],
        progress: Callable[[int, int], None] | None = None,
        on_start: Callable[[int], None] | None = None,
        on_batch: Callable[[int, int], None] | None = None,
    ) -> list[Generation]:
        """progress(prompts_done, new_tokens) after each committed chunk; on_start(n_to_generate) once;
        on_batch(prompts_done, new_tokens) after each of the engine's own batches (passed to engine.generate as
        its progress callback), so progress can be shown independently of the commit chunk."""
        fp = self.engine.fingerprint
        rendered = [self.engine.render(p) for p in prompts]
        keys = [generation_key(fp, r, p.params) for r, p in zip(rendered, prompts)]
        unique: dict[str, int] = {}
        for i, k in enumerate(keys):
            unique.setdefault(k, i)
        hits = self.store.get_generations(list(unique))
        misses = [i for k, i in unique.items() if k not in hits]
        self.stats.requests += len(prompts)
        self.stats.unique += len(unique)
        self.stats.cache_hits += len(unique) - len(misses)
        if on_start:
            on_start(len(misses))
        results: dict[str, Generation] = {k: Generation(tuple(o), tuple(t), cached=True) for k, (o, t) in hits.items()}
        if misses:
            # grouped by decoding parameters (a batch can only share one setting), then longest first: the
            # biggest batch fails fast if memory is short, and lengths inside a chunk are close
            misses.sort(key=lambda i: (json.dumps(prompts[i].params.key(), sort_keys=True), -len(rendered[i])))
            t0 = time.time()

            def row(i: int, g: Generation) -> tuple:
                return (keys[i], fp, rendered[i], prompts[i].params, list(g.texts), list(g.n_tokens))

            for c in range(0, len(misses), self.chunk_size):
                chunk = misses[c : c + self.chunk_size]
                try:
                    batch_args = {"progress": on_batch} if on_batch is not None else {}
                    gens = self.engine.generate([prompts[i] for i in chunk], **batch_args)
                except Exception as e:
                    # an engine that fails part-way (a served model whose endpoint gave up) may say what did
                    # finish: commit those before the error travels on, so a rerun does not ask for them again
                    done = [row(i, g) for i, g in zip(chunk, getattr(e, "partial", None) or []) if g is not None]
                    if done:
                        self.store.put_generations(done)
                    raise
                rows = []
                for i, g in zip(chunk, gens):
                    results[keys[i]] = g
                    rows.append(row(i, g))
                self.store.put_generations(rows)
                ntok = sum(sum(g.n_tokens) for g in gens)
                self.stats.generated += len(chunk)
                self.stats.new_tokens += ntok
                if progress:
                    progress(len(chunk), ntok)
            self.stats.seconds += time.time() - t0
        return [results[k] for k in keys]
