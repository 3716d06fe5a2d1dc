"""The two scorers: log-likelihood of continuations (multiple choice) and greedy generation (open questions).

Both take already-encoded prompts (`Prompt`: ids + pixel values) so the same code serves `wings eval`, the
forgetting report and the lm-evaluation-harness adapter, for MLLMs and plain causal LMs alike.
"""

from __future__ import annotations

import re
import string
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from .models import EvalModel, Prompt


@dataclass
class LoglikelihoodRequest:
    prompt: Prompt
    continuation: list[int]


@dataclass
class Loglikelihood:
    logprob: float  # sum over continuation tokens
    is_greedy: bool  # every continuation token is the argmax
    n_tokens: int


def _left_pad(seqs: Sequence[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Left padding puts every sequence's end at the same index: continuations are the last columns."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for row, s in enumerate(seqs):
        ids[row, width - len(s):] = torch.tensor(s, dtype=torch.long)
        mask[row, width - len(s):] = 1
    # True positions (padding does not shift them): plain HF LLMs would otherwise count from the buffer start.
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    return ids.to(device), mask.to(device), positions.to(device)


def _pixels(prompts: Sequence[Prompt], device) -> torch.Tensor | None:
    pix = [p.pixel_values for p in prompts if p.pixel_values is not None]
    return torch.cat(pix).to(device) if pix else None


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
        ids, mask, positions = _left_pad([r.prompt.ids + r.continuation for r in reqs], em.pad_id, em.device)
        keep = max(len(r.continuation) for r in reqs) + 1  # logits only where continuations are predicted
        kwargs = {"pixel_values": _pixels([r.prompt for r in reqs], em.device)} if em.multimodal else {}
        out = em.model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=False,
                       logits_to_keep=keep, **kwargs)
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
        ids, mask, _ = _left_pad([p.ids for p in ps], em.pad_id, em.device)
        kwargs = {"pixel_values": _pixels(ps, em.device)} if em.multimodal else {}
        out = em.model.generate(
            input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
            eos_token_id=stop_ids or None, pad_token_id=em.pad_id, **kwargs,
        )
        new = out[:, ids.shape[1]:]
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


_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = str.maketrans("", "", string.punctuation)


def normalise_answer(text: str) -> str:
    """SQuAD-style: lowercase, drop punctuation and the articles a/an/the, collapse whitespace."""
    text = text.lower().translate(_PUNCT)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def exact_match(prediction: str, answers: Sequence[str]) -> bool:
    pred = normalise_answer(prediction)
    return any(pred == normalise_answer(a) for a in answers)
