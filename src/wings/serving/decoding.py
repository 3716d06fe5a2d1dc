"""Per-request decoding inside one batched `generate`: text, stop sequences, limits, sampling and router weights.

`generate` takes one configuration per batch, so what differs between requests lives here, one object per row:
- `RowDecoder`: turns the row's new token into text (incrementally, `tokenizers.decoders.DecodeStream`), cuts
  at a stop sequence (holding back text that could still become one), counts tokens against its own
  `max_tokens`, notices a cancelled (disconnected) request, and pushes each delta to its client.
- `WaveMonitor`: a `StoppingCriteria` that `generate` calls after every step with the tokens so far; it feeds
  each row, reads the router weights the model recorded in that very forward (`wings_record`), and tells
  `generate` which rows are finished (they are padded from then on and never disturb the others).
- `PerRowSampler`: a `LogitsProcessor` that samples the rows that asked for sampling, each with its own
  temperature / top-p and its own seeded generator, and leaves greedy rows to `generate`'s argmax. A seeded
  request therefore gets the same tokens whatever else shares its batch.
- `RowSampler`: the same choice for one row of the running batch (engine.py), which has no `generate` around it.
"""

from __future__ import annotations

import secrets
import time
from dataclasses import dataclass

import torch
from tokenizers.decoders import DecodeStream
from transformers import LogitsProcessor, StoppingCriteria, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

from .errors import APIError


@dataclass
class Delta:
    """What one step adds to one request: released text, router cells, and the finish reason at the end."""

    text: str = ""
    cells: list[dict] | None = None  # one per generated token of this step, when the request asked for them
    prompt_cells: list[dict] | None = None  # the prompt's text tokens (first event only, on request)
    finish_reason: str | None = None
    completion_tokens: int = 0


@dataclass
class Failure:
    error: APIError


def router_cell(token_id: int, text: str, layer_weights: list[float]) -> dict:
    """One strip cell: the token (id, text), w_v averaged over learner layers, and each layer's w_v."""
    return {"id": token_id, "text": text, "w_v": round(sum(layer_weights) / len(layer_weights), 4),
            "layers": [round(w, 4) for w in layer_weights]}


class RowDecoder:
    """The decoding state of one request in a wave (a retry alone starts a fresh one)."""

    def __init__(self, ticket, tokenizer, eos_token_ids: set[int]):
        self.ticket = ticket
        self.prepared = ticket.prepared
        self.tokenizer = tokenizer
        self.backend = tokenizer.backend_tokenizer
        self.stream = DecodeStream(skip_special_tokens=True)
        self.eos = eos_token_ids
        self.stops = self.prepared.stop
        self.hold = max((len(s) for s in self.stops), default=1) - 1  # text that may still start a stop sequence
        self.text = ""
        self.ids: list[int] = []  # generated ids, end-of-sequence excluded
        self.released = 0
        self.tokens = 0
        self.finished = False
        self._cut = False  # the text was cut at a stop sequence
        self.stopped_by_cancel = False
        self.outbox: Delta | None = None  # this step's event, handed over by the monitor with the other rows'

    @property
    def wants_cells(self) -> bool:
        return self.prepared.router

    def step(self, token: int, layer_weights: list[float] | None) -> bool:
        """Take this row's new token; return True once the row is finished."""
        if self.finished:
            return True
        if self.ticket.cancelled:  # the client went away: stop spending steps on it
            self.finished = self.stopped_by_cancel = True
            return True
        self.tokens += 1
        times = getattr(self.ticket, "times", None)
        if times is not None:  # metrics: when each token was chosen (its delivery may wait for more text)
            times.tokens_until(self.tokens, time.monotonic())
        reason, piece = None, ""
        if token in self.eos:
            reason = "stop"
        else:
            self.ids.append(token)
            piece = self.stream.step(self.backend, token) or ""
            self.text += piece
            cut = self._find_stop(len(self.text) - len(piece))
            if cut is not None:
                self.text, reason, self._cut = self.text[:cut], "stop", True
        if reason is None and self.tokens >= self.prepared.max_new_tokens:
            reason = "length"
        if reason is not None:
            self._flush()
        cells = None
        if layer_weights is not None and self.wants_cells:
            label = piece if token not in self.eos else self.tokenizer.convert_ids_to_tokens(token)
            cells = [router_cell(token, label, layer_weights)]
        end = len(self.text) if reason else max(self.released, len(self.text) - self.hold)
        text, self.released = self.text[self.released:end], max(self.released, end)
        if text or cells or reason:
            self.outbox = Delta(text=text, cells=cells, finish_reason=reason, completion_tokens=self.tokens)
        self.finished = reason is not None
        return self.finished

    def _find_stop(self, new_from: int) -> int | None:
        if not self.stops:
            return None
        start = max(0, new_from - self.hold)
        found = [i for i in (self.text.find(s, start) for s in self.stops) if i >= 0]
        return min(found) if found else None

    def _flush(self) -> None:
        """At the end, bytes the incremental decoder still holds (an unfinished UTF-8 sequence) become text, as a
        whole-sequence decode would render them."""
        whole = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if whole.startswith(self.text) and len(whole) > len(self.text) and not self._cut:
            self.text = whole

    def close(self) -> None:
        """`generate` ended: a row that is still open ran out of steps (the batch's longest limit)."""
        if not self.finished:
            self.finished = True
            if not self.ticket.cancelled:
                self._flush()
                self.ticket.push(Delta(text=self.text[self.released:], finish_reason="length",
                                       completion_tokens=self.tokens))


def deliver(pairs: list[tuple[object, Delta]]) -> None:
    """Hand one step's events to their clients with one wake-up per event loop, not one per row: each wake-up
    makes the scheduler thread and the HTTP thread trade the interpreter lock."""
    by_loop: dict = {}
    for ticket, event in pairs:
        ticket.note(event)
        by_loop.setdefault(ticket.loop, []).append((ticket.queue, event))
    for loop, items in by_loop.items():
        try:
            loop.call_soon_threadsafe(_put_all, items)
        except RuntimeError:  # the event loop is closed: the server is shutting down
            pass


def _put_all(items: list) -> None:
    for queue, event in items:
        queue.put_nowait(event)


class WaveMonitor(StoppingCriteria):
    """Called by `generate` after each step (tokens chosen, before the next forward): feeds every row."""

    def __init__(self, rows: list[RowDecoder], record: dict | None, visual_ids):
        self.rows = rows
        self.record = record
        self.visual_ids = set(visual_ids)  # image placeholder ids: no router cell of their own
        self.first = True

    def __call__(self, input_ids: torch.LongTensor, scores, **kwargs) -> torch.BoolTensor:
        tokens = input_ids[:, -1].tolist()
        weights = self._last_position_weights()
        if self.first:
            self.first = False
            self._send_prompt_cells(input_ids[:, :-1])
        done = [row.step(token, None if weights is None else weights[i])
                for i, (row, token) in enumerate(zip(self.rows, tokens, strict=True))]
        deliver([(row.ticket, row.outbox) for row in self.rows if row.outbox is not None])
        for row in self.rows:
            row.outbox = None
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)

    def _layers(self) -> list[int]:
        return sorted(self.record) if self.record else []

    def _last_position_weights(self) -> list[list[float]] | None:
        """w_v of every learner layer at the position that produced this step's token: [B][L]."""
        if not self.record:
            return None
        w_v = torch.stack([self.record[k][:, -1, 0] for k in self._layers()], dim=1)  # [B, L]
        return w_v.float().cpu().tolist()

    def _send_prompt_cells(self, prompt: torch.LongTensor) -> None:
        """On request, the prefill's router weights of each prompt text token (image tokens left out)."""
        if not self.record or not any(r.prepared.prompt_router for r in self.rows):
            return
        w_v = torch.stack([self.record[k][:, :, 0] for k in self._layers()], dim=-1)  # [B, T, L]
        if w_v.shape[1] != prompt.shape[1]:
            return  # a forward that did not see the whole prompt (cannot happen with generate's prefill)
        for i, row in enumerate(self.rows):
            if not row.prepared.prompt_router:
                continue
            n = row.prepared.prompt_tokens
            ids = prompt[i, -n:].tolist()
            weights = w_v[i, -n:].float().cpu().tolist()
            stream = DecodeStream(skip_special_tokens=False)
            cells = []
            for token, layer_weights in zip(ids, weights, strict=True):
                piece = stream.step(row.backend, token) or ""
                if token not in self.visual_ids:
                    cells.append(router_cell(token, piece, layer_weights))
            row.ticket.push(Delta(prompt_cells=cells))


class RowSampler:
    """One row's choice of token in the running batch: greedy (None from `choose`: the batch's argmax stands), or
    sampled with this request's own warpers and seeded generator, as `PerRowSampler` samples in a wave."""

    def __init__(self, sampling, device: torch.device):
        self.warpers = None
        self.generator = None
        if sampling.temperature is None:
            return
        self.warpers = [TemperatureLogitsWarper(sampling.temperature)]
        if sampling.top_k:
            self.warpers.append(TopKLogitsWarper(sampling.top_k))
        if sampling.top_p is not None and sampling.top_p < 1.0:
            self.warpers.append(TopPLogitsWarper(sampling.top_p))
        seed = sampling.seed if sampling.seed is not None else secrets.randbits(63)
        self.generator = torch.Generator(device=device).manual_seed(seed)

    def choose(self, scores: torch.Tensor) -> int | None:
        """scores [V] (placeholders already at -inf) -> the sampled token, or None for greedy."""
        if self.warpers is None:
            return None
        row = scores[None]
        for warper in self.warpers:
            row = warper(None, row)
        return int(torch.multinomial(row.softmax(dim=-1)[0], 1, generator=self.generator))


class PerRowSampler(LogitsProcessor):
    """Sample the rows that asked for it (own temperature, top-k, top-p, generator); greedy rows untouched.

    A sampled row's scores become -inf except at the drawn token, so `generate` (run greedily) takes exactly it.
    """

    def __init__(self, rows: list[RowDecoder], device: torch.device):
        self.rows = rows
        self.warpers, self.generators = [], []
        for row in rows:
            s = row.prepared.sampling
            if s.temperature is None:
                self.warpers.append(None)
                self.generators.append(None)
                continue
            warpers = [TemperatureLogitsWarper(s.temperature)]
            if s.top_k:
                warpers.append(TopKLogitsWarper(s.top_k))
            if s.top_p is not None and s.top_p < 1.0:
                warpers.append(TopPLogitsWarper(s.top_p))
            seed = s.seed if s.seed is not None else secrets.randbits(63)
            self.warpers.append(warpers)
            self.generators.append(torch.Generator(device=device).manual_seed(seed))

    @property
    def samples_any(self) -> bool:
        return any(w is not None for w in self.warpers)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        for i, (row, warpers, generator) in enumerate(zip(self.rows, self.warpers, self.generators, strict=True)):
            if warpers is None or row.finished:
                continue
            row_scores = scores[i:i + 1]  # [1, V]
            for warper in warpers:
                row_scores = warper(input_ids[i:i + 1], row_scores)
            token = torch.multinomial(row_scores.softmax(dim=-1)[0], 1, generator=generator)
            scores[i] = float("-inf")
            scores[i, token] = 0.0
        return scores
