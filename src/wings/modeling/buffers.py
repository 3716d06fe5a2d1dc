"""Tensors that grow along one dimension without copying themselves at every append.

The learner cache appends a column (one new token's keys, position, segment, router values) at every decoding
step. `torch.cat` would copy the whole cache each time; a `ColumnBuffer` keeps spare capacity, writes new columns
in place and grows its storage geometrically when full, so each column is copied O(1) times over a whole
generation. A `TransposedColumnBuffer` stores [..., N, D] columns as [..., D, N] (see few_queries.py: the layout
in which a decoding step reads attention values fastest on the CPU).
"""

from __future__ import annotations

import torch


class ColumnBuffer:
    """`view` is the first `length` entries of `storage` along `dim`; `append` writes after them in place.

    Only without autograd: with gradients on, an earlier forward may have saved a view of the storage for its
    backward (even a tensor that needs no gradient: the other input of a matmul), so appends stay functional.
    """

    def __init__(self, first: torch.Tensor, dim: int, growth: float = 2.0):
        self.dim, self.growth = dim, growth
        self._used: torch.Tensor | None = None
        self.length = first.shape[dim]
        # A copy, never the caller's tensor: later appends (after a `truncate`) write into this storage.
        self.storage = first.clone(memory_format=torch.contiguous_format)

    @property
    def used(self) -> torch.Tensor:
        """The used part of the storage. Cached until the next change: the learners read their keys several times
        per decoding step."""
        if self._used is None:
            self._used = self.storage.narrow(self.dim, 0, self.length)
        return self._used

    @property
    def view(self) -> torch.Tensor:
        return self.used

    @property
    def capacity(self) -> int:
        return self.storage.shape[self.dim]

    def append(self, new: torch.Tensor) -> None:
        n = new.shape[self.dim]
        needed = self.length + n
        if torch.is_grad_enabled() or new.requires_grad or self.storage.requires_grad:  # autograd: functional
            self.storage = torch.cat([self.used, new], dim=self.dim)
        elif needed > self.capacity:  # grow geometrically (at least 64 columns): amortised O(1) copies per column
            capacity = max(needed, int(self.capacity * self.growth), self.capacity + 64)
            grown = self.storage.new_empty(_with_size(self.storage.shape, self.dim, capacity))
            grown.narrow(self.dim, 0, self.length).copy_(self.used)
            self.storage = grown
            self.storage.narrow(self.dim, self.length, n).copy_(new)
        else:
            self.storage.narrow(self.dim, self.length, n).copy_(new)
        self.length = needed
        self._used = None

    def truncate(self, length: int) -> None:
        """Forget the columns from `length` on (their storage is reused by later appends)."""
        self.length = min(self.length, length)
        self._used = None

    def select_batch(self, index: torch.Tensor) -> None:
        """Keep/reorder rows of dimension 0 (a copy of the used columns only)."""
        self.storage = self.used[index]
        self._used = None


class TransposedColumnBuffer(ColumnBuffer):
    """Columns along dim -2 of [..., N, D] tensors, stored as [..., D, N]; `view` is the [..., N, D] transpose of
    the used storage (a strided view: `view.stride(-2) == 1`)."""

    def __init__(self, first: torch.Tensor, growth: float = 2.0):
        super().__init__(first.transpose(-1, -2), first.dim() - 1, growth)

    @property
    def view(self) -> torch.Tensor:
        return self.used.transpose(-1, -2)

    def append(self, new: torch.Tensor) -> None:
        super().append(new.transpose(-1, -2))


def _with_size(shape: torch.Size, dim: int, size: int) -> list[int]:
    out = list(shape)
    out[dim] = size
    return out
