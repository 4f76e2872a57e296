"""engine/kvcache.py: the compact loop's in-place KV layer behaves as transformers' DynamicLayer (torch.cat)."""

from __future__ import annotations

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from comptrust.engine.kvcache import RoomyLayer, give_room


def _step(b: int, new: int = 1, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, 3, new, 8, generator=g), torch.randn(b, 3, new, 8, generator=g)


def test_roomy_layer_matches_dynamic_layer_through_growth_and_row_drops():
    k0, v0 = _step(4, new=5)
    ref = DynamicLayer()
    ref.update(k0, v0)
    ours = RoomyLayer(k0, v0, room=2)  # room for 2 tokens: the third step must grow the buffers
    for step in range(6):
        k, v = _step(ref.keys.shape[0], seed=step + 1)
        rk, rv = ref.update(k, v)
        ok, ov = ours.update(k, v)
        assert torch.equal(rk, ok) and torch.equal(rv, ov)
        assert ours.get_seq_length() == ref.get_seq_length() == 6 + step
        if step == 3:  # the compact loop drops finished rows
            keep = torch.tensor([0, 2, 3])
            ref.batch_select_indices(keep)
            ours.batch_select_indices(keep)
            assert torch.equal(ref.keys, ours.keys)
    ok.add_(1)  # what update returns are views of the buffers, not copies
    assert torch.equal(ours.keys, ok)


def test_give_room_replaces_only_plain_dynamic_layers():
    cache = DynamicCache()
    k, v = _step(2, new=3)
    cache.update(k, v, 0)
    assert give_room(cache, 4) == 1 and isinstance(cache.layers[0], RoomyLayer)
    assert cache.get_seq_length() == 3
    k1, v1 = _step(2, seed=9)
    keys, _ = cache.update(k1, v1, 0)
    assert torch.equal(keys, torch.cat([k, k1], dim=-2))
    assert give_room(cache, 4) == 0  # already roomy
