"""lm-evaluation-harness adapter: `lm_eval --model wings --model_args pretrained=DIR` on text-only tasks.

The same loader and scorers as `wings eval`, so a Wings/LLaVA-mode MLLM directory (scored text-only: no image,
so the visual learner is skipped) or a plain HF causal LM directory both work. Requests arrive as raw strings;
`--apply_chat_template` renders them with the model's chat template (ChatML when the tokenizer has none).

lm-eval has no flag to import a third-party model, so run it through this module, which registers `wings`
before handing the command line to lm-eval's own CLI:

    python -m wings.evaluation.lm_eval_adapter run --model wings --model_args pretrained=DIR \
        --tasks mmlu --device cpu --batch_size 8

or from Python: `import wings.evaluation.lm_eval_adapter` and then `lm_eval.simple_evaluate(model="wings", ...)`.
Generation is always greedy (`do_sample` / `temperature` in a task's generation_kwargs are ignored).
"""

from __future__ import annotations

import logging
from collections import defaultdict

# Built-in models register lazily and only while the registry is empty: import them before registering ours,
# or `--model hf` would stop resolving.
import lm_eval.models  # noqa: F401
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
from tqdm.auto import tqdm

from .models import Prompt, load_eval_model
from .scoring import LoglikelihoodRequest, generate, loglikelihoods

logger = logging.getLogger(__name__)
DEFAULT_MAX_GEN_TOKS = 256


@register_model("wings")
class WingsLM(TemplateLM):
    """model_args: pretrained (dir, required), dtype (float32), device, batch_size, max_length, add_bos_token."""

    def __init__(self, pretrained: str, dtype: str = "float32", device: str | None = None, batch_size: int | str = 8,
                 max_length: int | None = None, add_bos_token: bool | str = False, **kwargs):
        super().__init__()
        ignored = {k: v for k, v in kwargs.items() if k not in ("max_batch_size",) and v is not None}
        if ignored:
            logger.warning("wings: ignoring model arguments %s", sorted(ignored))
        if str(device).startswith("cuda"):
            import torch

            if not torch.cuda.is_available():
                logger.warning("wings: %s requested but CUDA is unavailable; using cpu", device)
                device = "cpu"
        self.em = load_eval_model(pretrained, device=device, dtype=dtype)
        self.tokenizer = self.em.tokenizer
        self.batch_size = 8 if str(batch_size).startswith("auto") else int(batch_size)
        config = getattr(self.em.model.config, "text_config", self.em.model.config)
        self.max_length = int(max_length or getattr(config, "max_position_embeddings", 2048))
        self.add_bos_token = str(add_bos_token).lower() in ("true", "1")

    # --- TemplateLM plumbing -----------------------------------------------------------------------------------
    @property
    def eot_token_id(self) -> int:
        eos = self.tokenizer.eos_token_id
        return self.em.pad_id if eos is None else int(eos)

    @property
    def device(self):
        return self.em.device

    @property
    def tokenizer_name(self) -> str:
        return str(self.em.path).replace("/", "__")

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        special = self.add_bos_token if add_special_tokens is None else add_special_tokens
        return list(self.tokenizer(string, add_special_tokens=special)["input_ids"])

    def chat_template(self, chat_template: bool | str = False) -> str | None:
        return self.em.chat_template if chat_template else None

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        return self.tokenizer.apply_chat_template(
            chat_history, chat_template=self.em.chat_template, tokenize=False,
            add_generation_prompt=add_generation_prompt, continue_final_message=not add_generation_prompt,
        )

    # --- requests --------------------------------------------------------------------------------------------
    def _fit(self, context: list[int], continuation: list[int]) -> tuple[list[int], list[int]]:
        """Left-truncate to the model's window, dropping context first (as lm-eval's HF model does)."""
        continuation = continuation[-self.max_length:]
        room = self.max_length - len(continuation)
        return (context[-room:] if room > 0 else []) or [self.prefix_token_id], continuation

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        reqs = [LoglikelihoodRequest(Prompt(ctx), cont) for ctx, cont in (self._fit(c, k) for _, c, k in requests)]
        scores = loglikelihoods(self.em, reqs, self.batch_size, progress=not disable_tqdm)
        out = []
        for (key, _, _), s in zip(requests, scores, strict=True):
            answer = (s.logprob, s.is_greedy)
            if key is not None:
                self.cache_hook.add_partial("loglikelihood", key, answer)
            out.append(answer)
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        windows, owners = [], []
        for k, (text,) in enumerate(r.args for r in requests):
            pairs = get_rolling_token_windows(self.tok_encode(text), self.prefix_token_id, self.max_length, 1)
            for ctx, cont in map(make_disjoint_window, pairs):
                windows.append(LoglikelihoodRequest(Prompt(ctx), cont))
                owners.append(k)
        totals = [0.0] * len(requests)
        scores = loglikelihoods(self.em, windows, self.batch_size, progress=not disable_tqdm)
        for k, s in zip(owners, scores, strict=True):
            totals[k] += s.logprob
        for r, total in zip(requests, totals, strict=True):
            self.cache_hook.add_partial("loglikelihood_rolling", (r.args[0],), total)
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        groups: dict[tuple, list[int]] = defaultdict(list)
        settings = {}
        for k, r in enumerate(requests):
            kwargs = dict(r.args[1] or {})
            until = kwargs.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            max_new = int(kwargs.pop("max_gen_toks", kwargs.pop("max_new_tokens", DEFAULT_MAX_GEN_TOKS)))
            key = (tuple(until), max_new)
            settings[key] = (until, max_new)
            groups[key].append(k)
        out = [""] * len(requests)
        bar = tqdm(total=len(requests), desc="generate_until", disable=disable_tqdm)
        for key, members in groups.items():
            until, max_new = settings[key]
            room = max(1, self.max_length - max_new)
            prompts = [Prompt(self.tok_encode(requests[k].args[0])[-room:]) for k in members]
            texts = generate(self.em, prompts, max_new, self.batch_size, stop_strings=until, progress=False)
            for k, text in zip(members, texts, strict=True):
                out[k] = text
                self.cache_hook.add_partial("generate_until", requests[k].args, text)
            bar.update(len(members))
        bar.close()
        return out


def main() -> None:
    """`python -m wings.evaluation.lm_eval_adapter run --model wings ...`: lm-eval's CLI with `wings` registered."""
    from lm_eval.__main__ import cli_evaluate

    cli_evaluate()


if __name__ == "__main__":
    main()
