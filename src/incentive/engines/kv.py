"""A KV cache that decodes without copying: each layer's keys and values live in a buffer sized for the whole
decode, new tokens are written in place and attention reads a view. HF's dynamic cache concatenates the whole
cache at every step (18% of a profiled decode step on the embedded model at 16 rows). Rows that finish leave
without a copy too where the decode step's kernel reads the cache by row index (``rows``): copying every
layer's buffers at each finish was ~0.15 s of a ~3 s rollout of the benchmark batch. The rows sampled from one
prompt hold equal copies of its keys and values; the kernel reads one of them for all (``prefix_rows``), so a
long prompt streams from memory once per step rather than once per sample."""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, DynamicLayer


class PreallocatedLayer(DynamicLayer):
    """One layer's keys and values in ``[rows, heads, capacity, head_dim]`` buffers, filled up to ``length``."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, capacity: int) -> None:
        super().__init__()
        self.device = keys.device
        self.length = keys.shape[-2]
        self.key_buffer = keys.new_empty(*keys.shape[:2], capacity, keys.shape[-1])
        self.value_buffer = values.new_empty(*values.shape[:2], capacity, values.shape[-1])
        self.key_buffer[:, :, : self.length] = keys
        self.value_buffer[:, :, : self.length] = values
        self.rows: torch.Tensor | None = None
        """The buffer row of each row of the batch after :meth:`batch_select_indices`; None: row i is row i."""
        self.prefix_rows: torch.Tensor | None = None
        """For each buffer row, the buffer row whose copy of its first ``prefix_length`` positions (its prompt)
        the decode kernel reads; None: each row reads its own."""
        self.prefix_length = 0
        self.is_initialized = True
        self._views()

    def _views(self) -> None:
        """``keys`` and ``values`` as views of the cached positions; None while ``rows`` picks buffer rows (the
        next :meth:`update` makes the buffers compact again)."""
        if self.rows is not None:
            self.keys = self.values = None
            return
        self.keys = self.key_buffer[:, :, : self.length]
        self.values = self.value_buffer[:, :, : self.length]

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: object, **kwargs: object
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write the new positions in place and return views of everything cached so far."""
        self._compact()
        end = self._end_after(key_states.shape[-2])
        self.key_buffer[:, :, self.length : end] = key_states
        self.value_buffer[:, :, self.length : end] = value_states
        self.written(key_states.shape[-2])
        return self.keys, self.values

    def written(self, positions: int) -> None:
        """Count ``positions`` new positions that a kernel wrote in place after the cached ones."""
        self.length = self._end_after(positions)
        self._views()

    def _end_after(self, positions: int) -> int:
        end = self.length + positions
        if end > self.key_buffer.shape[-2]:
            raise RuntimeError(f"KV cache full: {end} positions, capacity {self.key_buffer.shape[-2]}")
        return end

    def get_seq_length(self) -> int:
        return self.length

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        """Keep only the rows ``indices`` (in that order), done when rows finish: by index into the buffers
        (``rows``), without copying them."""
        self.rows = indices if self.rows is None else self.rows[indices]
        self._views()

    def share_prefix(self, sources: torch.Tensor, length: int) -> None:
        """Let buffer row i's first ``length`` positions be read from buffer row ``sources[i]``, which holds the
        same values there (a copy of the same prompt)."""
        self.prefix_rows, self.prefix_length = sources, length

    def _compact(self) -> None:
        """Copy the picked rows into buffers of their own, for callers that read the cache as tensors (each row
        then reads its own copy of its prompt: the row holding the shared one may be gone)."""
        if self.rows is not None:
            self.key_buffer = self.key_buffer.index_select(0, self.rows)
            self.value_buffer = self.value_buffer.index_select(0, self.rows)
            self.rows = None
            self._views()
        self.prefix_rows, self.prefix_length = None, 0

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("a preallocated decode cache is never cropped")

    def batch_repeat_interleave(self, repeats: int) -> None:
        raise NotImplementedError("select rows with batch_select_indices instead")


def preallocate(cache: Cache, rows: torch.Tensor, new_tokens: int) -> Cache:
    """Turn a prefilled cache into preallocated layers holding ``rows`` of it (a row index per decode row) and
    room for ``new_tokens`` more positions; decode rows taken from the same prefilled row share their prompt's
    positions (:meth:`PreallocatedLayer.share_prefix`)."""
    sources = first_of_each(rows)
    shared = not torch.equal(sources, torch.arange(len(rows)))
    for i, layer in enumerate(cache.layers):
        length = layer.get_seq_length()
        cache.layers[i] = PreallocatedLayer(layer.keys[rows], layer.values[rows], length + new_tokens)
        if shared:
            cache.layers[i].share_prefix(sources, length)
    return cache


def first_of_each(rows: torch.Tensor) -> torch.Tensor:
    """For each entry of ``rows``, the index of the first entry equal to it: ``[2, 0, 2, 0] -> [0, 1, 0, 1]``."""
    if len(rows) == 0:
        return rows.new_empty(0)
    first = torch.full((int(rows.max()) + 1,), len(rows), dtype=torch.long)
    first.scatter_reduce_(0, rows, torch.arange(len(rows)), reduce="amin")
    return first[rows]
