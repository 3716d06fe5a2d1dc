"""`POST /v1/completions`: OpenAI's (legacy) text completions, text-only, with `echo` and `logprobs`.

What lm-eval's `local-completions` model sends for log-likelihood tasks (multiple choice): the context and the
continuation as one prompt (text or token ids; one request may carry several prompts), `max_tokens=1`,
`echo=true`, `logprobs=1`, `temperature=0`. The answer's `logprobs.token_logprobs` then holds every prompt token's
log-probability given the tokens before it (None for the first), then the generated tokens'; `top_logprobs` the
`logprobs` most likely tokens at each position (a dict token text -> log-probability; the chosen token is added
when it is not among them, as vLLM does). Log-probabilities are the model's own distribution (log-softmax of
its logits), whatever sampling settings choose the tokens.

Fields: `prompt` (a string, a list of strings, a list of token ids, or a list of such lists), `max_tokens`
(default 16), `temperature`, `top_p`, `seed`, `stop`, `echo`, `logprobs` (0-20), `stream` (one prompt, without
`logprobs`), `stream_options`. `n`, `best_of`, `suffix`, penalties and `logit_bias` are accepted at their
defaults only. Images are refused: a prompt may not hold an image placeholder (as text or as an id).
"""

from __future__ import annotations

import time
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, Strict, StrictBool, StrictInt

from ..prompting import Prompt
from .errors import bad_request
from .inputs import Prepared, ServedModel
from .protocol import (
    SEED_MAX,
    SEED_MIN,
    StreamOptions,
    validate_body,
)

MAX_LOGPROBS = 20
MAX_PROMPTS = 64
DEFAULT_MAX_TOKENS = 16  # OpenAI's default for completions
UNSUPPORTED_UNLESS_DEFAULT = {"n": (1, None), "best_of": (1, None), "suffix": (None, ""),
                              "frequency_penalty": (0, 0.0, None), "presence_penalty": (0, 0.0, None),
                              "logit_bias": (None, {})}
KNOWN = {"model", "prompt", "max_tokens", "temperature", "top_p", "seed", "stop", "echo", "logprobs", "stream",
         "stream_options", "user", *UNSUPPORTED_UNLESS_DEFAULT}
Number = Annotated[float, Strict()]


class CompletionRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: str | None = None
    prompt: str | list[str] | list[StrictInt] | list[list[StrictInt]]
    max_tokens: StrictInt | None = Field(default=None, ge=1)
    temperature: Number | None = Field(default=None, ge=0.0, le=2.0, allow_inf_nan=False)
    top_p: Number | None = Field(default=None, gt=0.0, le=1.0, allow_inf_nan=False)
    seed: StrictInt | None = Field(default=None, ge=SEED_MIN, le=SEED_MAX)
    stop: str | list[str] | None = None
    echo: StrictBool = False
    logprobs: StrictInt | None = Field(default=None, ge=0, le=MAX_LOGPROBS)
    stream: StrictBool = False
    stream_options: StreamOptions | None = None

    def prompts(self) -> list[str | list[int]]:
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if not p:
            raise bad_request("prompt: must not be empty", param="prompt")
        if all(isinstance(x, int) for x in p):
            return [list(p)]
        return list(p)

    @property
    def stop_sequences(self) -> list[str]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if any(s == "" for s in stops):
            raise bad_request("stop: stop sequences must not be empty strings", param="stop")
        return stops


def parse_completion_request(body: dict) -> CompletionRequest:
    request = validate_body(body, CompletionRequest, KNOWN, UNSUPPORTED_UNLESS_DEFAULT)
    prompts = request.prompts()
    if len(prompts) > MAX_PROMPTS:
        raise bad_request(f"prompt: at most {MAX_PROMPTS} prompts per request, got {len(prompts)}", param="prompt")
    if request.stream and (len(prompts) > 1 or request.logprobs is not None):
        raise bad_request("stream: a streamed completion takes one prompt and no logprobs", param="stream")
    return request


def prepare_completions(served: ServedModel, request: CompletionRequest) -> list[Prepared]:
    """One `Prepared` per prompt (text-only), each checked against the context length."""
    from .inputs import Sampling

    if served.official:
        raise bad_request("compat='official' models serve chat completions only", param="model")
    tokenizer = served.processor.tokenizer
    vocab = len(tokenizer)
    visual = set(served.facts.visual_ids)
    mrope = getattr(getattr(served.codec, "arch", None), "mrope", False)
    chat_like = served._sampling(_AsChat(request))
    out = []
    for i, prompt in enumerate(request.prompts()):
        where = "prompt" if len(request.prompts()) == 1 else f"prompt[{i}]"
        if isinstance(prompt, str):
            ids = list(tokenizer(prompt, add_special_tokens=True)["input_ids"])
        else:
            ids = prompt
            bad = next((t for t in ids if not 0 <= t < vocab), None)
            if bad is not None:
                raise bad_request(f"{where}: token id {bad} is outside the vocabulary (0..{vocab - 1})", param=where)
        if not ids:
            raise bad_request(f"{where}: the prompt is empty", param=where)
        if any(t in visual for t in ids):
            raise bad_request(f"{where}: holds an image placeholder token; /v1/completions is text-only (send "
                              "images to /v1/chat/completions)", param=where)
        room = served.context_length - len(ids)
        max_tokens = request.max_tokens if request.max_tokens is not None else min(DEFAULT_MAX_TOKENS, room)
        if room < 1 or max_tokens > room:
            raise bad_request(f"{where}: the prompt is {len(ids)} tokens and {max_tokens} more were requested, but "
                              f"the model's context is {served.context_length} tokens", param=where,
                              code="context_length_exceeded")
        logprobs = request.logprobs
        out.append(Prepared(prompt=Prompt(ids, token_types=[0] * len(ids) if mrope else None), n_images=0,
                            max_new_tokens=max_tokens,
                            sampling=chat_like if chat_like.temperature is not None else Sampling(seed=request.seed),
                            stop=request.stop_sequences, logprobs=logprobs,
                            echo_logprobs=logprobs if request.echo and logprobs is not None else None))
    return out


class _AsChat:
    """The sampling fields of a completion request, read the way a chat request's are (ServedModel._sampling)."""

    def __init__(self, request: CompletionRequest):
        self.temperature = request.temperature
        self.top_p = request.top_p
        self.seed = request.seed


def _top(tokenizer, best: list[tuple[int, float]], chosen: tuple[int, float], k: int) -> dict[str, float]:
    entries = list(best[:k])
    if k and all(t != chosen[0] for t, _ in entries):
        entries.append(chosen)
    out: dict[str, float] = {}
    for token, lp in entries:
        text = tokenizer.decode([token])
        out[text] = max(lp, out.get(text, float("-inf")))
    return out


def logprobs_body(tokenizer, ticket, echo: bool, k: int) -> dict:
    """OpenAI's `logprobs` object: tokens, token_logprobs, top_logprobs, text_offset (prompt first with echo)."""
    entries = list(ticket.prompt_logprobs or []) if echo else []
    entries += ticket.token_logprobs
    tokens, token_lps, tops, offsets, offset = [], [], [], [], 0
    for token, lp, best in entries:
        text = tokenizer.decode([token])
        tokens.append(text)
        token_lps.append(lp)
        tops.append(None if best is None else _top(tokenizer, best, (token, lp), k))
        offsets.append(offset)
        offset += len(text)
    return {"tokens": tokens, "token_logprobs": token_lps, "top_logprobs": tops, "text_offset": offsets}


def completion_body(request_id: str, model: str, choices: list[dict], prompt_tokens: int,
                    completion_tokens: int) -> dict:
    return {"id": request_id, "object": "text_completion", "created": int(time.time()), "model": model,
            "choices": choices, "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                                          "total_tokens": prompt_tokens + completion_tokens}}

