"""A KV cache that writes each new position in place instead of concatenating (the decoding loop of tiltlm.policies.hf).

transformers' DynamicLayer grows its (B, heads, L, d_head) keys and values by ``torch.cat`` at every decoding step:
each step copies the whole cache of every layer (a quarter of the default model's sampling time at B = 64).
``ReservedLayer`` keeps them in a buffer with room for ``extra`` more positions and returns views of its filled
part: the attention sees the same values in the same shape, so its results are the same bit for bit
(tests/test_sampling_exact.py), and a step writes one position per layer.
"""

from __future__ import annotations

import torch

try:
    from transformers.cache_utils import DynamicLayer
except ImportError:  # an older transformers without cache layers: reserve() does nothing
    DynamicLayer = None


if DynamicLayer is not None:

    class ReservedLayer(DynamicLayer):
        """A DynamicLayer whose keys and values are views of a buffer with room for ``extra`` more positions."""

        def __init__(self, extra: int):
            super().__init__()
            self.extra = int(extra)
            self._buffers: tuple[torch.Tensor, torch.Tensor] | None = None

        def _in_buffer(self, m: int) -> bool:
            """The keys are the front of the buffer (not replaced, e.g. by a reorder) and m more positions fit."""
            if self._buffers is None:
                return False
            kb = self._buffers[0]
            return (self.keys.data_ptr() == kb.data_ptr() and self.keys.shape[:2] == kb.shape[:2]
                    and self.keys.stride() == kb.stride() and self.keys.shape[-2] + m <= kb.shape[-2])

        def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
            if not self.is_initialized:
                self.lazy_initialization(key_states, value_states)
            if self.keys.numel() == 0:  # first call: nothing cached yet
                self.keys, self.values = key_states[..., :0, :], value_states[..., :0, :]
            n, m = self.keys.shape[-2], key_states.shape[-2]
            if not self._in_buffer(m):
                self._allocate(n + m + self.extra, key_states, value_states)
            kb, vb = self._buffers
            kb[..., n : n + m, :] = key_states
            vb[..., n : n + m, :] = value_states
            self.keys, self.values = kb[..., : n + m, :], vb[..., : n + m, :]
            return self.keys, self.values

        def _allocate(self, capacity: int, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
            n = self.keys.shape[-2]
            shape_k = (*key_states.shape[:-2], capacity, key_states.shape[-1])
            shape_v = (*value_states.shape[:-2], capacity, value_states.shape[-1])
            kb = torch.empty(shape_k, dtype=key_states.dtype, device=key_states.device)
            vb = torch.empty(shape_v, dtype=value_states.dtype, device=value_states.device)
            kb[..., :n, :] = self.keys
            vb[..., :n, :] = self.values
            self._buffers = (kb, vb)
            self.keys, self.values = kb[..., :n, :], vb[..., :n, :]


def reserve(cache, extra: int) -> int:
    """Give every plain DynamicLayer of ``cache`` room for ``extra`` more positions (in place); returns how many
    layers now write in place (0 for a cache of another kind, which then grows as it always does)."""
    layers = getattr(cache, "layers", None)
    if DynamicLayer is None or not isinstance(layers, list):
        return 0
    count = 0
    for i, layer in enumerate(layers):
        if type(layer) is DynamicLayer:
            new = ReservedLayer(extra)
            new.__dict__.update({k: v for k, v in layer.__dict__.items() if k not in ("extra", "_buffers")})
            layers[i] = new
            count += 1
        elif isinstance(layer, ReservedLayer):
            layer.extra = max(layer.extra, int(extra))
            count += 1
    return count
