"""Length-grouped sampling by modality: every batch is all-image or all-text, and batches hold similar lengths.

Like LLaVA's `group_by_modality_length`, but leftovers never mix modalities: each modality's shuffled index list
is padded (by repeating its own first indices, as `DistributedSampler` does) to a multiple of one optimizer
step, `batch_size * world_size`, so that every step (all ranks' batches) is one modality. Within a "megabatch"
of `megabatch_mult` steps, indices are sorted by length and cut into steps; each step is spread over the ranks
balancing their token totals; then the order of the steps is shuffled.

The sampler yields the *global* order. The HF Trainer (through accelerate) cuts it into per-device batches of
`batch_size` and gives batch k to rank k % world_size, so each rank sees its own share of every step. Every rank
must build the sampler with the same seed. Wire it into a Trainer subclass through `_get_train_sampler`:

    def _get_train_sampler(self, *args, **kwargs):
        ds = self.train_dataset
        return ModalityLengthGroupedSampler(ds.lengths, ds.is_multimodal, self.args.per_device_train_batch_size,
                                            world_size=self.args.world_size, seed=self.args.seed)
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from torch.utils.data import Sampler


def _spread(step: list[int], lengths: Sequence[int], world_size: int, batch_size: int) -> list[int]:
    """Deal a length-sorted step over the ranks: each index goes to the non-full rank with the fewest tokens."""
    ranks: list[list[int]] = [[] for _ in range(world_size)]
    totals = [0] * world_size
    for i in step:
        r = min((r for r in range(world_size) if len(ranks[r]) < batch_size), key=totals.__getitem__)
        ranks[r].append(i)
        totals[r] += lengths[i]
    return [i for rank in ranks for i in rank]


def _check_sizes(batch_size: int, world_size: int, megabatch_mult: int) -> None:
    if batch_size < 1 or world_size < 1 or megabatch_mult < 1:
        raise ValueError(f"batch_size ({batch_size}), world_size ({world_size}) and megabatch_mult "
                         f"({megabatch_mult}) must be positive")


def modality_length_grouped_indices(lengths: Sequence[int], is_multimodal: Sequence[bool], batch_size: int,
                                    world_size: int = 1, generator: torch.Generator | None = None,
                                    megabatch_mult: int = 8) -> list[int]:
    """The global index order described in the module docstring (may repeat a few indices per modality)."""
    if len(lengths) != len(is_multimodal):
        raise ValueError(f"{len(lengths)} lengths but {len(is_multimodal)} modality flags")
    _check_sizes(batch_size, world_size, megabatch_mult)
    step = batch_size * world_size
    steps: list[list[int]] = []
    for flag in (True, False):
        group = [i for i, m in enumerate(is_multimodal) if bool(m) == flag]
        if not group:
            continue
        group = [group[p] for p in torch.randperm(len(group), generator=generator).tolist()]
        pad = -len(group) % step
        group += (group * (pad // len(group) + 1))[:pad]
        mega = step * megabatch_mult
        for start in range(0, len(group), mega):
            block = sorted(group[start: start + mega], key=lambda i: lengths[i], reverse=True)
            steps += [_spread(block[s: s + step], lengths, world_size, batch_size) for s in range(0, len(block), step)]
    order = torch.randperm(len(steps), generator=generator).tolist()
    return [i for k in order for i in steps[k]]


class ModalityLengthGroupedSampler(Sampler[int]):
    """Seeded sampler over `modality_length_grouped_indices`; `set_epoch(e)` reshuffles (seed + e)."""

    def __init__(self, lengths: Sequence[int], is_multimodal: Sequence[bool], batch_size: int, world_size: int = 1,
                 seed: int = 0, megabatch_mult: int = 8):
        self.lengths, self.is_multimodal = list(lengths), [bool(m) for m in is_multimodal]
        self.batch_size, self.world_size, self.seed, self.megabatch_mult = batch_size, world_size, seed, megabatch_mult
        self.epoch = 0
        _check_sizes(batch_size, world_size, megabatch_mult)
        if len(self.lengths) != len(self.is_multimodal):
            raise ValueError(f"{len(self.lengths)} lengths but {len(self.is_multimodal)} modality flags")

    @classmethod
    def from_dataset(cls, dataset, batch_size: int, **kwargs) -> ModalityLengthGroupedSampler:
        return cls(dataset.lengths, dataset.is_multimodal, batch_size, **kwargs)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        yield from modality_length_grouped_indices(self.lengths, self.is_multimodal, self.batch_size,
                                                   self.world_size, generator, self.megabatch_mult)

    def __len__(self) -> int:
        step = self.batch_size * self.world_size
        n_image = sum(self.is_multimodal)
        return sum(-(-n // step) * step for n in (n_image, len(self.is_multimodal) - n_image))
