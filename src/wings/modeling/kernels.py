"""Runtime choices of HOW the Wings parts run. None of them changes WHAT the model computes: each fast path has an
equality test against its reference path (tests/test_model_fused.py), and the benchmarks switch them off one by
one to show what each buys (docs/PERFORMANCE.md). They live on the model instance (`model.wings_kernels`), not in
the config: a checkpoint does not carry them."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class WingsKernels:
    # Router summary as extra value channels of the main SDPA call (several queries), or from the main
    # attention's own probabilities (decoding); False: a separate attention pass after the main one (reference).
    fused_router: bool = True
    # One matmul for low-rank projections that share an input (the down-projections of both learners' queries,
    # of a learner's keys and values) or an output (both learners' output up-projections, router weights applied
    # to the rank-r activations); False: one matmul per projection and a full-width blend (reference).
    fused_lowrank: bool = True
    # Recompute the learners' activations (queries, keys, values, attention) in the backward instead of keeping
    # them: less memory for one more learner forward. Only in training with autograd on; off by default.
    learner_recompute: bool = False
    # Without earlier keys (training, evaluation, a first prefill), the learners attend with the queries grouped by
    # token kind: a causal attention of each kind over itself plus the other kind over the keys it can see, instead
    # of all queries against all keys under a mask (grouped.py); False: the masked form.
    grouped_learners: bool = True
