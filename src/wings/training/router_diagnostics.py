"""What the Wings router does while it trains: an HF `TrainerCallback` that every `wings train` run with a router
gets (`router_callbacks`).

On each optimizer step that the Trainer logs, the model's forward records the router weights of every layer
(`wings_record`, the same record the server's router strip reads) and the callback reduces them at once to:

    router/w_v_image_tokens        mean visual weight on the image tokens of image-bearing samples
    router/w_v_text_tokens         mean visual weight on the text tokens of image-bearing samples
    router/w_v_text_only           mean visual weight the router gives text-only samples (the model overrides it
                                   with 0 / 1 there: a text-only sample has no visual keys)
    router/w_v_std                 standard deviation of w_v over the tokens of image samples, all layers pooled
    router/w_v_std_in_layer        the same within each layer, averaged over layers: the token-wise spread (0 for
                                   a router that gives every token of a layer the same weight)
    router/entropy                 mean entropy of (w_v, w_t) on image samples, in nats (ln 2 = 0.693 is uniform)
    router/logit_gap               mean of log(w_v / w_t) on image samples (the softmax's input gap)
    router/grad_norm               L2 norm of the router's gradient before clipping (all layers)

(a key is left out when the step had no such token; group_by_modality gives all-image or all-text batches).
They go into the logged dict (console, the stage log, `trainer_state.json`'s log history) and, one JSON row per
logged step with the per-layer means too, into `router_diagnostics.jsonl` in the run's output folder.
Integrations that log before this callback runs (TensorBoard, wandb) do not see them.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from transformers import TrainerCallback

LOG_FILE = "router_diagnostics.jsonl"
_EPS = 1e-12


class RouterStats:
    """Running sums of router weights over forwards, by token kind and by layer (reduced as they arrive)."""

    KINDS = ("image_tokens", "text_tokens", "text_only")

    def __init__(self):
        self.sum = dict.fromkeys(self.KINDS, 0.0)
        self.count = dict.fromkeys(self.KINDS, 0)
        self.sq = 0.0  # sum of w_v^2 over image-sample tokens (for the spread)
        self.entropy = 0.0
        self.gap = 0.0
        self.layer_sum: dict[int, float] = {}
        self.layer_sq: dict[int, float] = {}
        self.layer_count: dict[int, int] = {}

    @torch.no_grad()
    def add(self, record: dict[int, torch.Tensor], input_ids: torch.Tensor, valid: torch.Tensor,
            image_token_id: int) -> None:
        """record: {layer: weights [B, T, 2]}; input_ids / valid [B, T] of the same forward."""
        is_image = input_ids == image_token_id
        has_image = is_image.any(dim=1, keepdim=True)
        masks = {"image_tokens": valid & is_image, "text_tokens": valid & ~is_image & has_image,
                 "text_only": valid & ~has_image}
        in_image_sample = masks["image_tokens"] | masks["text_tokens"]
        for layer, weights in record.items():
            w = weights.float()
            w_v = w[..., 0]
            for kind, mask in masks.items():
                self.sum[kind] += float(w_v[mask].sum())
                self.count[kind] += int(mask.sum())
            sel = w[in_image_sample]  # [N, 2]
            self.sq += float((sel[:, 0] ** 2).sum())
            self.entropy += float(torch.special.entr(sel).sum())
            self.gap += float((sel[:, 0].clamp_min(_EPS).log() - sel[:, 1].clamp_min(_EPS).log()).sum())
            self.layer_sum[layer] = self.layer_sum.get(layer, 0.0) + float(sel[:, 0].sum())
            self.layer_sq[layer] = self.layer_sq.get(layer, 0.0) + float((sel[:, 0].double() ** 2).sum())
            self.layer_count[layer] = self.layer_count.get(layer, 0) + sel.shape[0]

    def summary(self) -> dict[str, float]:
        out = {f"router/w_v_{kind}": self.sum[kind] / self.count[kind] for kind in self.KINDS if self.count[kind]}
        n = self.count["image_tokens"] + self.count["text_tokens"]
        if n:
            mean = (self.sum["image_tokens"] + self.sum["text_tokens"]) / n
            out["router/w_v_std"] = math.sqrt(max(0.0, self.sq / n - mean * mean))
            stds = [math.sqrt(max(0.0, self.layer_sq[k] / c - (self.layer_sum[k] / c) ** 2))
                    for k, c in self.layer_count.items() if c]
            out["router/w_v_std_in_layer"] = sum(stds) / len(stds)
            out["router/entropy"] = self.entropy / n
            out["router/logit_gap"] = self.gap / n
        return out

    def per_layer(self) -> dict[int, float]:
        return {layer: self.layer_sum[layer] / self.layer_count[layer]
                for layer in sorted(self.layer_sum) if self.layer_count[layer]}


class RouterDiagnostics(TrainerCallback):
    """Router statistics on every logged step (see the module docstring); inactive for a model without a router.

    Args:
        path: the JSONL file to append rows to (None: `<output_dir>/router_diagnostics.jsonl`).
    """

    def __init__(self, path: str | Path | None = None):
        self.path = Path(path) if path is not None else None
        self.rows: list[dict] = []  # every row written, also kept here for callers in the same process
        self._routers: list[torch.nn.Module] = []
        self._handles: list = []
        self._armed = False
        self._stats: RouterStats | None = None
        self._grad_sq: dict[int, float] = {}
        self._pending: dict | None = None
        self._image_token_id = -1

    # -- hooks on the model --------------------------------------------------------------------------------------

    def _before_forward(self, module, args, kwargs):
        if not (self._armed and module.training) or kwargs.get("wings_record") is not None:
            return None
        kwargs["wings_record"] = {}
        self._inputs = (kwargs.get("input_ids"), kwargs.get("attention_mask"), kwargs["wings_record"])
        return args, kwargs

    def _after_forward(self, module, args, kwargs, output):
        inputs = getattr(self, "_inputs", None)
        self._inputs = None
        if inputs is None or self._stats is None:
            return None
        input_ids, mask, record = inputs
        if input_ids is None or not record:
            return None
        valid = torch.ones_like(input_ids, dtype=torch.bool) if mask is None or mask.ndim != 2 else mask.bool()
        self._stats.add(record, input_ids, valid[:, -input_ids.shape[1]:], self._image_token_id)
        return None

    def _grad_hook(self, index: int):
        def hook(param: torch.Tensor) -> None:
            if self._armed and param.grad is not None:  # after accumulation: the last call holds the step's sum
                self._grad_sq[index] = float(param.grad.detach().float().pow(2).sum())
        return hook

    # -- Trainer events ------------------------------------------------------------------------------------------

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        from ..modeling.router import WingsRouter

        if model is None:
            return
        self._routers = [m for m in model.modules() if isinstance(m, WingsRouter)]
        if not self._routers:
            return
        self._image_token_id = int(getattr(model.config, "image_token_id", -1))
        if self.path is None:
            self.path = Path(args.output_dir) / LOG_FILE
        self._handles = [model.register_forward_pre_hook(self._before_forward, with_kwargs=True),
                         model.register_forward_hook(self._after_forward, with_kwargs=True)]
        params = [p for r in self._routers for p in r.parameters() if p.requires_grad]
        self._handles += [p.register_post_accumulate_grad_hook(self._grad_hook(i)) for i, p in enumerate(params)]

    def on_step_begin(self, args, state, control, **kwargs):
        if not self._routers:
            return
        step = state.global_step + 1  # the step about to run, as the Trainer counts it when it logs
        self._armed = step % max(1, int(state.logging_steps or args.logging_steps)) == 0 or (
            step == 1 and args.logging_first_step)
        self._stats = RouterStats() if self._armed else None
        self._grad_sq = {}

    def on_step_end(self, args, state, control, **kwargs):
        if not self._armed or self._stats is None:
            return
        self._armed = False
        row = {"step": state.global_step, **self._stats.summary()}
        if self._grad_sq:
            row["router/grad_norm"] = math.sqrt(sum(self._grad_sq.values()))
        row["per_layer_w_v"] = {str(k): v for k, v in self._stats.per_layer().items()}
        self._pending = row
        self._stats = None

    def on_log(self, args, state, control, logs=None, **kwargs):
        row, self._pending = self._pending, None
        if row is None or logs is None or "loss" not in logs or row["step"] != state.global_step:
            return
        scalars = {k: round(v, 6) for k, v in row.items() if k.startswith("router/")}
        logs.update(scalars)  # what later callbacks (the printed log, the stage's log file) show
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(scalars)  # trainer_state.json
        self.rows.append(row)
        if state.is_world_process_zero and self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with self.path.open("a") as f:
                f.write(json.dumps(row) + "\n")

    def on_train_end(self, args, state, control, **kwargs):
        for handle in self._handles:
            handle.remove()
        self._handles = []


def router_callbacks(model) -> list[TrainerCallback]:
    """[RouterDiagnostics()] when `model` carries a Wings router, else [] (what `wings.training.train` adds)."""
    from ..modeling.router import WingsRouter

    return [RouterDiagnostics()] if any(isinstance(m, WingsRouter) for m in model.modules()) else []


def read_rows(path: str | Path) -> list[dict]:
    """The rows of a `router_diagnostics.jsonl` (an absent file: none)."""
    p = Path(path)
    if not p.is_file():
        return []
    return [json.loads(line) for line in p.read_text().splitlines() if line.strip()]
