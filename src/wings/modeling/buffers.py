"""A tensor that grows along one dimension without copying itself at every append.

The learner cache appends a column (one new token's keys, position, segment, router values) at every decoding
step. `torch.cat` would copy the whole cache each time; a `ColumnBuffer` keeps spare capacity, writes new columns
in place and doubles its storage when full, so each column is copied O(1) times over a whole generation.
"""

from __future__ import annotations

import torch


class ColumnBuffer:
    """`view` is the first `length` entries of `storage` along `dim`; `append` writes after them in place.

    Only without autograd: with gradients on, an earlier forward may have saved a view of the storage for its
    backward (even a tensor that needs no gradient: the other input of a matmul), so appends stay functional.
    """

    def __init__(self, first: torch.Tensor, dim: int):
        self.dim = dim
        self._view: torch.Tensor | None = None
        self.length = first.shape[dim]
        # A copy, never the caller's tensor: later appends (after a `truncate`) write into this storage.
        self.storage = first.clone(memory_format=torch.contiguous_format)

    @property
    def view(self) -> torch.Tensor:
        # Cached until the next change: the learners read their keys several times per decoding step.
        if self._view is None:
            self._view = self.storage.narrow(self.dim, 0, self.length)
        return self._view

    @property
    def capacity(self) -> int:
        return self.storage.shape[self.dim]

    def append(self, new: torch.Tensor) -> None:
        n = new.shape[self.dim]
        needed = self.length + n
        if torch.is_grad_enabled() or new.requires_grad or self.storage.requires_grad:  # autograd: functional
            self.storage = torch.cat([self.view, new], dim=self.dim)
        elif needed > self.capacity:  # double (at least): amortised O(1) copies per column
            grown = self.storage.new_zeros(_with_size(self.storage.shape, self.dim, max(needed, 2 * self.capacity)))
            grown.narrow(self.dim, 0, self.length).copy_(self.view)
            self.storage = grown
            self.storage.narrow(self.dim, self.length, n).copy_(new)
        else:
            self.storage.narrow(self.dim, self.length, n).copy_(new)
        self.length = needed
        self._view = None

    def truncate(self, length: int) -> None:
        """Forget the columns from `length` on (their storage is reused by later appends)."""
        self.length = min(self.length, length)
        self._view = None

    def select_batch(self, index: torch.Tensor) -> None:
        """Keep/reorder rows of dimension 0 (a copy of the used columns only)."""
        self.storage = self.view[index]
        self._view = None


def _with_size(shape: torch.Size, dim: int, size: int) -> list[int]:
    out = list(shape)
    out[dim] = size
    return out
