"""Where a trained Wings router sends each token: visual weight by question type, layer and token kind.

Runs the model over evaluation prompts (easy-vqa questions with their image, text-only questions) with
`wings_record` and averages the recorded `w_v`:

    per_type[type][kind]     mean w_v over layers, kind in image_tokens / text_tokens / last_token (the token
                             that predicts the answer); types are the easy-vqa question types and "text-only"
    per_layer[layer][type]   mean w_v over every token of that type's prompts at that layer
    spread                   the standard deviation of w_v over all tokens of image prompts (every layer): how
                             much the weight changes from token to token; 0 for a uniform mix
    type_range               max - min over question types of the last token's mean w_v

The study calls routing "token-wise" when `spread` >= TOKENWISE_SPREAD: a typical token's weight differs from
the mean by at least 0.1, so the two learners are mixed visibly differently from token to token.
"""

from __future__ import annotations

import math

import torch

TOKENWISE_SPREAD = 0.1
KINDS = ("image_tokens", "text_tokens", "last_token")


@torch.no_grad()
def router_profile(model_dir, tasks: dict[str, list], categories: dict[str, dict[str, str]],
                   max_items: int = 96, batch_size: int = 16) -> dict:
    """tasks: {task name: its TaskItems}; categories: {task name: {item id: question type}} (text-only tasks
    count as "text-only"). Returns the profile described in the module docstring."""
    from ..evaluation import load_eval_model
    from ..evaluation.scoring import _left_pad, _pixels

    em = load_eval_model(model_dir, device="cpu")
    config = em.model.config
    if config.mode != "wings" or not config.use_router:
        raise ValueError(f"{model_dir} has no router to profile")
    sums: dict[tuple, float] = {}
    counts: dict[tuple, int] = {}
    sq = total = n = 0.0

    def add(key: tuple, values: torch.Tensor) -> None:
        sums[key] = sums.get(key, 0.0) + float(values.sum())
        counts[key] = counts.get(key, 0) + values.numel()

    for name, items in tasks.items():
        items = items[:max_items]
        for start in range(0, len(items), batch_size):
            chunk = items[start:start + batch_size]
            prompts = [em.encode_item(item)[0] for item in chunk]
            ids, mask, positions = _left_pad([p.ids for p in prompts], em.pad_id, em.device)
            record: dict = {}
            em.model(input_ids=ids, attention_mask=mask, position_ids=positions,
                     pixel_values=_pixels(prompts, em.device), use_cache=False, logits_to_keep=1, wings_record=record)
            valid = mask.bool()
            is_image = ids == config.image_token_id
            for row, item in enumerate(chunk):
                qtype = categories.get(name, {}).get(item.id, "text-only") if is_image[row].any() else "text-only"
                for layer, weights in record.items():
                    w_v = weights[row, :, 0].float()
                    image_tok = w_v[valid[row] & is_image[row]]
                    text_tok = w_v[valid[row] & ~is_image[row]]
                    if image_tok.numel():
                        add((qtype, "image_tokens"), image_tok)
                    add((qtype, "text_tokens"), text_tok)
                    add((qtype, "last_token"), w_v[-1:])  # left padding: the last column is the prompt's end
                    add(("layer", layer, qtype), w_v[valid[row]])
                    if qtype != "text-only":
                        every = w_v[valid[row]]
                        sq += float((every ** 2).sum())
                        total += float(every.sum())
                        n += every.numel()
    per_type: dict[str, dict[str, float]] = {}
    for key, s in sums.items():
        if key[0] != "layer":
            per_type.setdefault(key[0], {})[key[1]] = s / counts[key]
    per_layer: dict[str, dict[str, float]] = {}
    for key, s in sums.items():
        if key[0] == "layer":
            per_layer.setdefault(str(key[1]), {})[key[2]] = s / counts[key]
    mean = total / n if n else float("nan")
    spread = math.sqrt(max(0.0, sq / n - mean * mean)) if n else float("nan")
    last = [v["last_token"] for t, v in per_type.items() if t != "text-only" and "last_token" in v]
    return {"per_type": per_type, "per_layer": per_layer, "mean_w_v": mean, "spread": spread,
            "type_range": (max(last) - min(last)) if last else float("nan"),
            "tokenwise": bool(spread >= TOKENWISE_SPREAD), "threshold": TOKENWISE_SPREAD}
