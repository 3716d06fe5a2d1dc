"""`compat="official"`: the released AIDC-AI/Wings inference computation, so its checkpoint runs unchanged.

Per sample, with S tokens, one image of n tokens at true positions [b, b+n) and spl = system_prompt_length:

- visual learner: keys = the image's projected tokens at their true positions, NO mask (every query, even
  one before the image, sees the whole image);
- textual learner: keys = layer-0 embeddings of the text tokens at positions >= spl (image excluded), at
  their true positions; the mask compares the key's *column* j with the query's *index* i (j <= i), i.e. the
  main causal mask sliced to the first N_text columns: a query sees text tokens that come after it;
- router: the position router over the first S of its columns (our position router indexes columns by true
  position, which for an unpadded sample is the same column);
- combination: both outputs are added twice, `2 * (w_v * Vis + w_t * Txt)`;
- a sample without an image: textual keys = all its tokens (system prompt included), ordinary causal mask,
  output added once and unweighted (`+ Txt`). Without a router (stage 1): the outputs are added once.

In a left-padded batch each sample gets exactly its own bs=1 computation (index = true position).
Because a query's textual output depends on tokens after it, appending a token changes earlier hidden
states: the math cannot be cached, so this mode always recomputes the whole sequence (as the released code).
"""

from __future__ import annotations

import torch

from .learner import LearnerKeys
from .state import WingsState, token_set


def use_cache_official(cache, use_cache: bool | None) -> bool:
    """Official compat never caches; a cache handed in by the caller is an error, not silently ignored."""
    if cache is not None and use_cache is not False:
        raise ValueError(
            "compat='official' cannot decode with a KV cache (its textual learner lets earlier tokens attend to "
            "later ones); call the model and `generate` with use_cache=False"
        )
    return False


def apply_official(state: WingsState, inputs_embeds: torch.Tensor, is_image: torch.Tensor,
                   attention_mask: torch.Tensor, position_ids: torch.Tensor, rotary_emb, config) -> None:
    """Switch a freshly built state to the released model's key sets and masks (see the module docstring)."""
    valid = attention_mask[:, -is_image.shape[1]:].bool()
    per_image = config.image_seq_length
    images = (is_image & valid).sum(dim=1) // per_image
    if bool((images > 1).any()):
        raise ValueError(
            f"compat='official' reproduces the released model, which reads one image per sample; got "
            f"{int(images.max())} images in one sample"
        )
    has_image = images > 0
    keep = ~is_image & valid & ((position_ids >= config.system_prompt_length) | ~has_image[:, None])
    state.textual_tokens = None
    if bool(keep.any()):
        state.textual_tokens = token_set(inputs_embeds, keep, position_ids, rotary_emb)
    state.compat_official = {"has_image": has_image}


def learner_mask(kind: str, keys: LearnerKeys, query_positions: torch.Tensor) -> torch.Tensor:
    """[B, T, N] mask of the released learners: visual unmasked, textual column-vs-query-index causal."""
    T = query_positions.shape[1]
    if kind == "visual":
        return keys.valid[:, None, :].expand(-1, T, -1)
    column = torch.arange(keys.valid.shape[1], device=keys.valid.device)
    return keys.valid[:, None, :] & (column[None, None, :] <= query_positions[:, :, None])


def combine(vis: torch.Tensor | None, txt: torch.Tensor | None, weights: torch.Tensor,
            state: WingsState) -> torch.Tensor:
    """Router-weighted learner outputs as the released code adds them (twice with an image, once without)."""
    has_image = state.compat_official["has_image"][:, None, None]
    w_vis, w_txt = weights[..., :1], weights[..., 1:]
    doubled = 2 * w_txt * txt if txt is not None else torch.zeros_like(w_txt)
    if vis is not None:
        doubled = doubled + 2 * w_vis * vis
    alone = txt if txt is not None else torch.zeros_like(doubled)
    return torch.where(has_image, doubled, alone)
