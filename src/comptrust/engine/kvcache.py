"""A KV cache layer for the compact decode loop that writes each new token in place instead of re-copying the cache.

transformers' DynamicLayer appends a decode step's K/V with torch.cat, which allocates and copies every layer's whole
cache at every step: on the 2-core CPU (embedded model, 64 rows, ~200 cached tokens) those copies were ~15% of the
decode time and most of its memory traffic. RoomyLayer keeps each layer's K and V in buffers with room for every
token the batch can still generate; a step writes one column into them, and the layer's `keys` / `values` are views
of the filled columns, which is what the attention reads (strided views: the same values, the same results).
Dropping finished rows (the compact loop's batch_select_indices) copies the live rows once, as before.
"""

from __future__ import annotations

from typing import Any

from transformers.cache_utils import DynamicLayer


class RoomyLayer(DynamicLayer):
    """A DynamicLayer whose K/V live in preallocated buffers [rows, heads, capacity, dim]; grows (doubling) only if
    a step would overflow them."""

    def __init__(self, keys: Any, values: Any, room: int) -> None:
        super().__init__()
        self.dtype, self.device = keys.dtype, keys.device
        self.length = keys.shape[-2]
        self._kbuf = self._alloc(keys, self.length + room)
        self._vbuf = self._alloc(values, self.length + room)
        self.is_initialized = True
        self._views()

    @staticmethod
    def _alloc(src: Any, capacity: int) -> Any:
        buf = src.new_empty((*src.shape[:-2], capacity, src.shape[-1]))
        buf[..., : src.shape[-2], :] = src
        return buf

    def _views(self) -> None:
        self.keys = self._kbuf[..., : self.length, :]
        self.values = self._vbuf[..., : self.length, :]

    def update(self, key_states: Any, value_states: Any, *args: Any, **kwargs: Any) -> tuple[Any, Any]:
        new = key_states.shape[-2]
        if self.length + new > self._kbuf.shape[-2]:
            grow = max(self.length + new, 2 * self._kbuf.shape[-2])
            self._kbuf, self._vbuf = self._alloc(self.keys, grow), self._alloc(self.values, grow)
        self._kbuf[..., self.length : self.length + new, :] = key_states
        self._vbuf[..., self.length : self.length + new, :] = value_states
        self.length += new
        self._views()
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self.length

    def batch_select_indices(self, indices: Any) -> None:
        self._kbuf, self._vbuf = self._kbuf[indices], self._vbuf[indices]
        self._views()

    def crop(self, tokens_to_remove: int) -> None:  # not used by the engine; kept consistent with DynamicLayer
        keep = self.length - tokens_to_remove if tokens_to_remove >= 0 else self.length + tokens_to_remove
        self.length = max(0, min(self.length, keep))
        self._views()


def give_room(cache: Any, room: int) -> int:
    """Replace the plain DynamicLayers of `cache` (prefilled) with RoomyLayers that can take `room` more tokens each;
    other layer kinds (sliding windows, hybrids) are left as they are. Returns how many layers were replaced."""
    done = 0
    for i, lay in enumerate(cache.layers):
        if type(lay) is DynamicLayer and lay.is_initialized and lay.keys.dim() == 4:
            cache.layers[i] = RoomyLayer(lay.keys, lay.values, room)
            done += 1
    return done
