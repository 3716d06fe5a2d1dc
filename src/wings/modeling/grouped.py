"""The learners' attention with the queries grouped by token kind: only the (query, key) pairs the mask lets through.

A learner's keys are the tokens of one kind (image tokens for the visual learner, text tokens for the textual one),
and a query at true position p sees the keys at positions <= p. Attending with all T queries under that mask
computes every (query, key) pair, visible or not. With the queries grouped by kind as well (visual tokens, then
text tokens, each group in sequence order, padded per batch like the keys):

- the learner's own kind: query i of the group sees exactly keys 0..i of the same group, a plain causal attention
  (`is_causal`: GPU kernels skip the hidden blocks; PyTorch's CPU kernel only whole blocks of 512 keys, so on the
  CPU grouping bought 1-1.5% of a training step, docs/PERFORMANCE.md);
- the other kind: a masked attention over the keys that any of its queries can see at all (for the textual learner
  the text before the last image: with one image after a short prompt, a few keys).

With one 576-token image in 1039 tokens this computes ~0.23 of the textual learner's pairs and ~0.72 of the visual
learner's. It applies when a forward has no earlier keys (training, evaluation, a first prefill): then every key is
one of this forward's tokens. `WingsKernels.grouped_learners=False` is the masked reference it is tested against.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .learner import LearnerKeys, LoRRALearner, additive_mask, as_dtype, open_empty_rows


@dataclass
class TokenGrouping:
    """This forward's tokens in grouped order: `rows` = [visual tokens | text tokens], each group padded to its
    largest count in the batch (as the learner keys are)."""

    index: torch.Tensor  # [B * R] the token of each row, as a row of the flattened [B * T] tokens
    inverse: torch.Tensor  # [B * T] the row of each token, as a row of the flattened [B * R] rows (0 for padding)
    token_valid: torch.Tensor  # [B, T, 1] the real tokens of this forward
    positions: torch.Tensor  # [B, R] true positions of the rows
    rope: tuple[torch.Tensor, torch.Tensor]  # [B, 1, R, hd] RoPE tables of the rows
    n_visual: int  # rows [:n_visual] are visual tokens, the rest text tokens
    visible: dict[str, int]  # kind -> how many of its keys the other group's queries can see (a prefix)

    # Both directions are `index_select`s over the flattened batch, not `gather`s: a gather saves its whole input
    # for the backward (h', full width, in every layer), an index_select only the index.
    def rows(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, T, d] -> [B, R, d] in grouped order."""
        B, R = self.positions.shape
        return x.flatten(0, 1).index_select(0, self.index).view(B, R, x.shape[-1])

    def tokens(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, R, c] -> [B, T, c] back in sequence order, 0 at padding tokens."""
        B, T, _ = self.token_valid.shape
        picked = x.flatten(0, 1).index_select(0, self.inverse).view(B, T, x.shape[-1])
        return picked * self.token_valid.to(x.dtype)

    def own_and_other(self, kind: str) -> tuple[slice, slice]:
        """Row slices of the learner's own kind and of the other kind."""
        visual, textual = slice(0, self.n_visual), slice(self.n_visual, None)
        return (visual, textual) if kind == "visual" else (textual, visual)


def token_grouping(visual, textual, token_valid: torch.Tensor, visible: dict[str, int]) -> TokenGrouping:
    """From the two token sets of `state.build_state` (TokenSet with `index`; either may be None)."""
    sets = [s for s in (visual, textual) if s is not None]
    index = torch.cat([s.index for s in sets], dim=1)
    valid = torch.cat([s.valid for s in sets], dim=1)
    B, T = token_valid.shape
    R = index.shape[1]
    rows = torch.arange(R, device=index.device).expand(B, R)
    # Padding rows write into an extra column that is dropped (their index points at some unrelated token).
    inverse = torch.zeros(B, T + 1, dtype=torch.long, device=index.device)
    inverse.scatter_(1, torch.where(valid, index, T), rows)
    offsets = torch.arange(B, device=index.device)[:, None]
    return TokenGrouping(
        index=(index + offsets * T).flatten(), inverse=(inverse[:, :T] + offsets * R).flatten(),
        token_valid=token_valid[..., None],
        positions=torch.cat([s.positions for s in sets], dim=1),
        rope=(torch.cat([s.cos for s in sets], dim=2), torch.cat([s.sin for s in sets], dim=2)),
        n_visual=visual.feats.shape[1] if visual is not None else 0, visible=visible)


def visible_prefixes(visual_keep: torch.Tensor, textual_keep: torch.Tensor) -> list[torch.Tensor]:
    """[visual keys seen by any text query, text keys seen by any image query] (0-d tensors; the caller syncs them
    with its other counts): per sample the keys before the other kind's last token, the largest in the batch."""
    column = torch.arange(visual_keep.shape[1], device=visual_keep.device)
    last_visual = torch.where(visual_keep, column, -1).max(dim=1, keepdim=True).values
    last_text = torch.where(textual_keep, column, -1).max(dim=1, keepdim=True).values
    return [(visual_keep & (column < last_text)).sum(1).max(), (textual_keep & (column < last_visual)).sum(1).max()]


def grouped_attention(learner: LoRRALearner, kind: str, query: torch.Tensor, keys: LearnerKeys,
                      grouping: TokenGrouping, memo: dict) -> torch.Tensor:
    """query [B, H, R, hd] (grouped rows, RoPE applied) -> A_o MHA [B, R, r]: the learner's output before its
    up-projection, row by row (0 for a row that sees no key)."""
    own, other = grouping.own_and_other(kind)
    key, value = as_dtype(keys.key, query.dtype), as_dtype(keys.value, query.dtype)
    B = query.shape[0]
    mine = F.scaled_dot_product_attention(query[:, :, own], key, value, is_causal=True)  # [B, H, N, hd]
    parts = [learner.o_proj.down(mine.transpose(1, 2).reshape(B, mine.shape[2], -1))]
    rows = query[:, :, other]
    n = grouping.visible[kind]
    if rows.shape[2] and n:
        if f"grouped/{kind}" not in memo:  # shared by every layer of this forward
            positions, valid = keys.positions[:, None, :n], keys.valid[:, None, :n]
            safe, sees_any = open_empty_rows(valid & (positions <= grouping.positions[:, other, None]))
            memo[f"grouped/{kind}"] = (additive_mask(safe, query.dtype), sees_any.to(query.dtype))
        visible = LearnerKeys(key[:, :, :n], value[:, :, :n], keys.positions[:, :n], keys.valid[:, :n])
        parts.append(learner.attend(rows, visible, memo[f"grouped/{kind}"]))
    else:  # no query of the other kind sees any key of this one
        parts.append(parts[0].new_zeros(B, rows.shape[2], parts[0].shape[-1]))
    return torch.cat(parts if kind == "visual" else parts[::-1], dim=1)  # rows in grouped order
