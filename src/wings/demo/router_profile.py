"""Where a trained Wings router sends each token: visual weight by question type, layer and token kind.

Runs the model over evaluation prompts (easy-vqa questions with their image, text-only questions) with
`wings_record` and averages the recorded `w_v`:

    per_type[type][kind]     mean w_v over layers, kind in image_tokens / text_tokens / last_token (the token
                             that predicts the answer); types are the easy-vqa question types and "text-only"
    per_layer[layer][type]   mean w_v over every token of that type's prompts at that layer
    spread                   token-wise spread: the standard deviation of w_v over the tokens of image prompts
                             within one layer, averaged over layers; 0 for a router that gives every token of a
                             layer the same weight (a fixed per-layer mix)
    spread_pooled            the same over all layers' tokens pooled (differences between layers count too)
    layer_range              max - min over layers of the mean w_v on image prompts
    image_text_gap           mean w_v on image tokens minus on text tokens, image prompts
    type_range               max - min over question types of the last token's mean w_v

The study calls routing "token-wise" when `spread` >= TOKENWISE_SPREAD: within a layer, a typical token's weight
differs from that layer's mean by at least 0.1, so the two learners are mixed visibly differently per token.
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

    em = load_eval_model(model_dir, device="cpu")
    config = em.model.config
    if config.mode != "wings" or not config.use_router:
        raise ValueError(f"{model_dir} has no router to profile")
    sums: dict[tuple, float] = {}
    counts: dict[tuple, int] = {}
    moments: dict[int, list[float]] = {}  # layer -> [n, sum, sum of squares] over the tokens of image prompts

    def add(key: tuple, values: torch.Tensor) -> None:
        sums[key] = sums.get(key, 0.0) + float(values.sum())
        counts[key] = counts.get(key, 0) + values.numel()

    for name, items in tasks.items():
        items = items[:max_items]
        for start in range(0, len(items), batch_size):
            chunk = items[start:start + batch_size]
            inputs = em.batch([em.encode_item(item)[0] for item in chunk])  # left-padded, true positions
            record: dict = {}
            em.model(**inputs, use_cache=False, logits_to_keep=1, wings_record=record)
            ids, valid = inputs["input_ids"], inputs["attention_mask"].bool()
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
                        every = w_v[valid[row]].double()
                        m = moments.setdefault(layer, [0.0, 0.0, 0.0])
                        m[0], m[1], m[2] = m[0] + every.numel(), m[1] + float(every.sum()), m[2] + float(
                            (every ** 2).sum())
    per_type: dict[str, dict[str, float]] = {}
    for key, s in sums.items():
        if key[0] != "layer":
            per_type.setdefault(key[0], {})[key[1]] = s / counts[key]
    per_layer: dict[str, dict[str, float]] = {}
    for key, s in sums.items():
        if key[0] == "layer":
            per_layer.setdefault(str(key[1]), {})[key[2]] = s / counts[key]
    def std(n: float, total: float, sq: float) -> float:
        return math.sqrt(max(0.0, sq / n - (total / n) ** 2)) if n else float("nan")

    pooled = [sum(m[k] for m in moments.values()) for k in range(3)]
    spread = sum(std(*m) for m in moments.values()) / len(moments) if moments else float("nan")
    layer_means = [m[1] / m[0] for m in moments.values() if m[0]]
    image_types = {t: v for t, v in per_type.items() if t != "text-only"}
    last = [v["last_token"] for v in image_types.values() if "last_token" in v]

    def kind_mean(kind: str) -> float:
        keys = [(t, kind) for t in image_types if (t, kind) in sums]
        return sum(sums[k] for k in keys) / max(1, sum(counts[k] for k in keys)) if keys else float("nan")

    return {"per_type": per_type, "per_layer": per_layer,
            "mean_w_v": pooled[1] / pooled[0] if pooled[0] else float("nan"), "spread": spread,
            "spread_pooled": std(*pooled), "layer_range": (max(layer_means) - min(layer_means)) if layer_means
            else float("nan"), "image_text_gap": kind_mean("image_tokens") - kind_mean("text_tokens"),
            "type_range": (max(last) - min(last)) if last else float("nan"),
            "tokenwise": bool(spread >= TOKENWISE_SPREAD), "threshold": TOKENWISE_SPREAD}
