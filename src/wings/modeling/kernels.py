"""Runtime choices of HOW the Wings parts run. None of them changes WHAT the model computes: each fast path has an
equality test against its reference path (tests/test_model_fused.py), and the benchmarks switch them off one by
one to show what each buys (docs/PERFORMANCE.md). They live on the model instance (`model.wings_kernels`), not in
the config: a checkpoint does not carry them."""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts, noop_context_fn


@dataclass
class WingsKernels:
    # Router summary as extra value channels of the main SDPA call (several queries), or from the main
    # attention's own probabilities (decoding); False: a separate attention pass after the main one (reference).
    fused_router: bool = True
    # One matmul for low-rank projections that share an input (the down-projections of both learners' queries,
    # of a learner's keys and values) or an output (both learners' output up-projections, router weights applied
    # to the rank-r activations); False: one matmul per projection and a full-width blend (reference).
    fused_lowrank: bool = True
    # Recompute the learners' activations in the backward instead of keeping them (only in training with autograd
    # on; off by default). True: everything (queries, keys, values, attention), the least memory for one more
    # learner forward. "projections": keep the learners' attention outputs and recompute only what is cheap to
    # redo (projections, RoPE, the grouping gathers): most of the saving for a few % of that time
    # (docs/PERFORMANCE.md, "Memory").
    learner_recompute: bool | str = False
    # Without earlier keys (training, evaluation, a first prefill), the learners attend with the queries grouped by
    # token kind: a causal attention of each kind over itself plus the other kind over the keys it can see, instead
    # of all queries against all keys under a mask (grouped.py); False: the masked form.
    grouped_learners: bool = True


# The fused attention kernels SDPA dispatches to (the math fallback is plain matmuls and softmax: recomputed).
_ATTENTION_OPS = {getattr(torch.ops.aten, name).default for name in (
    "_scaled_dot_product_flash_attention_for_cpu", "_scaled_dot_product_flash_attention",
    "_scaled_dot_product_efficient_attention", "_scaled_dot_product_cudnn_attention",
    "_scaled_dot_product_fused_attention_overrideable") if hasattr(torch.ops.aten, name)}


def _keep_attention(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    return CheckpointPolicy.MUST_SAVE if op in _ATTENTION_OPS else CheckpointPolicy.PREFER_RECOMPUTE


def recompute_context(policy: bool | str):
    """`context_fn` of the learners' checkpoint for a `WingsKernels.learner_recompute` value."""
    if policy is True:
        return noop_context_fn
    if policy == "projections":  # selective: the attention kernels' outputs are saved, the rest replayed
        return functools.partial(create_selective_checkpoint_contexts, _keep_attention)
    raise ValueError(f"learner_recompute must be False, True or 'projections', got {policy!r}")
