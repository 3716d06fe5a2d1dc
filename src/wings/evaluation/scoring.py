"""The two scorers: log-likelihood of continuations (multiple choice) and greedy generation (open questions).

Both take already-encoded prompts (`Prompt`: ids + pixel tensors, wings.prompting) so the same code serves
`wings eval`, the forgetting report and the lm-evaluation-harness adapter, for MLLMs and plain causal LMs alike.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from tqdm.auto import tqdm

from .answers import exact_match, normalise_answer

if TYPE_CHECKING:
    from .models import EvalModel, Prompt

__all__ = ["Loglikelihood", "LoglikelihoodRequest", "exact_match", "generate", "loglikelihoods",
           "normalise_answer"]


@dataclass
class LoglikelihoodRequest:
    prompt: Prompt
    continuation: list[int]


@dataclass
class Loglikelihood:
    logprob: float  # sum over continuation tokens
    is_greedy: bool  # every continuation token is the argmax
    n_tokens: int


def _batches(order: list[int], batch_size: int) -> list[list[int]]:
    if batch_size < 1:
        raise ValueError(f"batch size must be >= 1, got {batch_size}")
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


@torch.no_grad()
def loglikelihoods(em: EvalModel, requests: Sequence[LoglikelihoodRequest], batch_size: int = 8,
                   progress: bool = True, desc: str = "loglikelihood") -> list[Loglikelihood]:
    """log p(continuation | prompt) for each request, batched longest-first (less padding, early OOM)."""
    for r in requests:
        if not r.continuation:
            raise ValueError("a log-likelihood request has an empty continuation")
    order = sorted(range(len(requests)), key=lambda i: -(len(requests[i].prompt.ids) + len(requests[i].continuation)))
    results: list[Loglikelihood | None] = [None] * len(requests)
    bar = tqdm(total=len(requests), desc=desc, disable=not progress, leave=False)
    for batch in _batches(order, batch_size):
        reqs = [requests[i] for i in batch]
        inputs = em.batch([r.prompt.extended(r.continuation) for r in reqs])  # left padding: continuations last
        keep = max(len(r.continuation) for r in reqs) + 1  # logits only where continuations are predicted
        out = em.model(**inputs, use_cache=False, logits_to_keep=keep)
        logprobs = torch.log_softmax(out.logits[:, -keep:].float(), dim=-1)  # [B, keep, V]
        for row, (i, r) in enumerate(zip(batch, reqs, strict=True)):
            c = len(r.continuation)
            # position keep-1 predicts the token after the sequence; the continuation is predicted by the c before it
            lp = logprobs[row, keep - 1 - c: keep - 1]
            target = torch.tensor(r.continuation, device=lp.device)
            token_lp = lp.gather(-1, target[:, None]).squeeze(-1)
            greedy = bool((lp.argmax(-1) == target).all())
            results[i] = Loglikelihood(float(token_lp.sum()), greedy, c)
        bar.update(len(batch))
    bar.close()
    return results  # type: ignore[return-value]


@torch.no_grad()
def generate(em: EvalModel, prompts: Sequence[Prompt], max_new_tokens: int = 32, batch_size: int = 8,
             stop_strings: Sequence[str] = (), progress: bool = True, desc: str = "generate") -> list[str]:
    """Greedy generation (left padding), decoded without special tokens, cut at the first stop string."""
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i].ids))
    texts: list[str] = [""] * len(prompts)
    stop_ids = em.stop_token_ids()
    bar = tqdm(total=len(prompts), desc=desc, disable=not progress, leave=False)
    for batch in _batches(order, batch_size):
        ps = [prompts[i] for i in batch]
        inputs = em.batch(ps)
        inputs.pop("position_ids", None)  # generate derives them from the mask, step by step
        out = em.model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False,
                                eos_token_id=stop_ids or None, pad_token_id=em.pad_id)
        new = out[:, inputs["input_ids"].shape[1]:]
        for i, row in zip(batch, new, strict=True):
            # Cut at the first stop token by hand: skip_special_tokens alone would keep text generated after it.
            tokens = row.tolist()
            for k, tok in enumerate(tokens):
                if tok in stop_ids:
                    tokens = tokens[:k]
                    break
            text = em.tokenizer.decode(tokens, skip_special_tokens=True)
            for stop in stop_strings:
                if stop and stop in text:
                    text = text[: text.index(stop)]
            texts[i] = text
        bar.update(len(batch))
    bar.close()
    return texts
