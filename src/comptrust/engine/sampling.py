"""Counter-based sampling: each draw is a function of (seed, prompt tokens, sample index, step, token id).

So a prompt's samples depend neither on its batch mates nor on how the decode loop runs, and a whole sampling
step runs on the device without a host sync (it can be captured in a CUDA graph).
"""

from __future__ import annotations

import hashlib
from typing import Sequence

from comptrust.types import GenParams

M31 = 0x7FFF_FFFF


def _mix31(x):
    """A 31-bit integer hash (xorshift-multiply; no product exceeds 2**61, so int64 never overflows)."""
    x = x ^ (x >> 16)
    x = (x * 0x2C1B3C6D) & M31
    x = x ^ (x >> 15)
    x = (x * 0x297A2D39) & M31
    x = x ^ (x >> 16)
    return x


def row_seed(seed: int, tokens: Sequence[int], j: int) -> int:
    """The sampling key of output row j of a prompt: depends on nothing but (seed, prompt tokens, j)."""
    digest = hashlib.sha256(repr((seed, list(tokens), j)).encode()).digest()
    return int.from_bytes(digest[:8], "little") & 0x3FFF_FFFF_FFFF_FFFF


def counter_uniform(seed_lo, seed_hi, step, token_ids):
    """Uniforms in (0, 1), float64, one per (row, candidate token), from (row key, step, token id) alone."""
    import torch

    if not isinstance(step, torch.Tensor):
        step = torch.tensor(step, dtype=torch.long, device=token_ids.device)
    s = _mix31((step * 0x9E37 + 0x1234567) & M31)
    h = _mix31((token_ids ^ s) & M31)
    h = _mix31(h ^ seed_hi[:, None])
    h = _mix31(h ^ seed_lo[:, None])
    return (h.double() + 0.5) / float(1 << 31)


def sample_next(logits, params: GenParams, top_k: int | None, seed_lo, seed_hi, step):
    """Next tokens: argmax for greedy; else temperature, then top-k (the model's generation config, 50 by
    default as in transformers and the reference harness), then top-p, then one draw per row by the Gumbel-max
    trick with counter_uniform noise. Runs on the device, no host sync: it can be captured in a CUDA graph."""
    import torch

    if params.greedy:
        return logits.argmax(-1)
    x = logits.float() / params.temperature
    k = min(top_k or x.shape[-1], x.shape[-1])
    vals, idx = torch.topk(x, k, dim=-1)
    probs = torch.softmax(vals, dim=-1)
    logp = torch.log_softmax(vals, dim=-1)
    if params.top_p < 1.0:
        cut = (probs.cumsum(-1) - probs) > params.top_p  # keep the smallest prefix whose mass reaches top_p
        logp = logp.masked_fill(cut, float("-inf"))
    u = counter_uniform(seed_lo, seed_hi, step, idx)
    choice = (logp.double() - torch.log(-torch.log(u))).argmax(-1)
    return idx.gather(-1, choice[:, None]).squeeze(-1)

