"""Continuous batching: requests join the running batch between decode steps, and leave it as soon as they end.

The scheduler thread loops over:
1. admission: waiting requests are taken in arrival order while the running batch has room (`max_batch_size`
   rows) and their prompt tokens fit the prefill budget (`max_prefill_tokens` per iteration; the first waiting
   request is always taken, so a long prompt is never starved). When nothing is running, the thread waits up to
   `gather_seconds` for a burst to arrive together, as the wave scheduler does;
2. prefill: the admitted requests run as their own left-padded batch, images included, into a fresh
   learner-aware cache (batch.py); each gets its first token, then the group is merged into the running batch
   (`WingsDynamicCache.concat_batch`: both caches left-padded to a common length);
3. one decode step for every running row; finished rows (end of sequence, stop sequence, `max_tokens`) and rows
   whose client went away leave the batch at once (`WingsDynamicCache.filter_batch`, which also trims columns
   that are padding in every remaining row).

A row's tokens do not depend on the other rows: its positions, padding and learner keys are its own, greedy rows
take the argmax and sampled rows draw from their own seeded generator, so an answer equals the one the same
request gets alone. The budget bounds how long running streams pause for a prefill.

Failures: a prefill that raises is retried one request at a time (the request that fails on its own gets the
error, the others their answers); a decode step that raises fails the rows running then (each gets a 500) and
the server goes on with the next requests.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch

from .batch import ModelRunner
from .decoding import Delta, RowDecoder, RowSampler, deliver, router_cell
from .errors import APIError
from .features import FeatureCache
from .scheduler import MAX_GATHER_SECONDS, Scheduler, Ticket

logger = logging.getLogger("wings.serve")


@dataclass
class Slot:
    """One running row: its request, its decoder (text, stops, limits) and its sampler."""

    ticket: Ticket
    decoder: RowDecoder
    sampler: RowSampler
    aborted: bool = False  # its client went away (counted once)

    @property
    def gone(self) -> bool:
        return self.decoder.finished or self.ticket.cancelled


@dataclass
class Running:
    """The running batch: the cache and mask its rows share, and per row the token to feed next, its next text
    position and its M-RoPE delta."""

    cache: object
    mask: torch.Tensor
    tokens: torch.Tensor
    lengths: torch.Tensor
    deltas: torch.Tensor
    slots: list[Slot]

    def keep(self, index: list[int]) -> None:
        where = torch.tensor(index, dtype=torch.long, device=self.tokens.device)
        self.mask = self.cache.filter_batch(where, self.mask)
        self.tokens, self.lengths, self.deltas = self.tokens[where], self.lengths[where], self.deltas[where]
        self.slots = [self.slots[i] for i in index]

    def join(self, other: Running) -> None:
        self.mask = self.cache.concat_batch(other.cache, self.mask, other.mask)
        self.tokens = torch.cat([self.tokens, other.tokens])
        self.lengths = torch.cat([self.lengths, other.lengths])
        self.deltas = torch.cat([self.deltas, other.deltas])
        self.slots += other.slots


class ContinuousScheduler(Scheduler):
    """Requests join a running batch between decode steps (see the module docstring)."""

    kind = "continuous"

    def __init__(self, served, max_batch_size: int = 8, max_queue: int = 64, gather_seconds: float = 0.02,
                 metrics=None, max_prefill_tokens: int = 4096, image_cache_size: int = 256):
        super().__init__(served, max_batch_size, max_queue, gather_seconds, metrics)
        if max_prefill_tokens < 1:
            raise ValueError(f"max_prefill_tokens must be >= 1, got {max_prefill_tokens}")
        self.max_prefill_tokens = max_prefill_tokens
        self.features = FeatureCache(image_cache_size) if image_cache_size > 0 else None
        self.runner = ModelRunner(served, self.features)
        self.running: Running | None = None
        self.steps = 0
        self.max_running_seen = 0

    def running_count(self) -> int:
        """Rows of the running batch that have not ended (see Scheduler.running_count)."""
        run = self.running
        return 0 if run is None else sum(not s.gone for s in list(run.slots))

    def stats(self) -> dict:
        out = super().stats()
        out.update(prefills=out["waves"], decode_steps=self.steps, max_running_seen=self.max_running_seen,
                   max_prefill_tokens=self.max_prefill_tokens)
        if self.features is not None:
            out["image_cache"] = {"entries": len(self.features), "hits": self.features.hits,
                                  "misses": self.features.misses}
        return out

    # --- the model's thread ---------------------------------------------------------------------------------

    def _loop(self) -> None:
        while (admitted := self._admit()) is not None:
            if admitted:
                self._prefill(admitted)
            if self.running is not None:
                self._step()
        if self.running is not None:  # stopping: whatever still runs is cut off
            for slot in self.running.slots:
                slot.ticket.fail(APIError(503, "the server is shutting down", code="shutting_down"))
            self.running = None
            self._running = 0

    def _admit(self) -> list[Ticket] | None:
        """The requests to prefill now (possibly none), or None once the scheduler stops."""
        with self._cond:
            while not self._stopping and self.running is None and (self._paused or not self._pending):
                self._cond.wait()
            if self._stopping:
                return None
            room = self.max_batch_size - self._running
            if self._paused or not self._pending or room <= 0:
                return []
            if self.running is None:  # idle: let a burst arrive together (as a wave would)
                while not self._stopping and len(self._pending) < room:
                    waited = time.monotonic() - self._pending[0].submitted_at
                    limit = MAX_GATHER_SECONDS if self._preparing else self.gather_seconds
                    if waited >= limit:
                        break
                    self._cond.wait(limit - waited)
                if self._stopping:
                    return None
            admitted, budget = [], self.max_prefill_tokens
            while self._pending and len(admitted) < room:
                ticket = self._pending[0]
                if ticket.cancelled:  # its client went away while it waited
                    self._pending.popleft().aborted(0)
                    continue
                if admitted and ticket.prepared.prompt_tokens > budget:
                    break
                budget -= ticket.prepared.prompt_tokens
                admitted.append(self._pending.popleft())
            return admitted

    def _prefill(self, tickets: list[Ticket]) -> None:
        started = time.monotonic()
        for ticket in tickets:
            ticket.times.admit(started, ticket.submitted_at)
        try:
            group = self._prefilled(tickets)
        except Exception as err:  # noqa: BLE001  (isolate the failing request, keep the server alive)
            if len(tickets) == 1:
                logger.warning("request %s failed in prefill: %s: %s", tickets[0].id, type(err).__name__, err)
                tickets[0].fail(err)
                return
            logger.exception("prefill of %d requests failed; retrying them one at a time", len(tickets))
            for ticket in tickets:
                if ticket.emitted:  # its client has part of an answer that a rerun cannot continue exactly
                    ticket.fail(err)
                elif not ticket.cancelled:
                    self._prefill([ticket])
            return
        self.batch_sizes[len(tickets)] += 1
        self._recent_wave_seconds.append(time.monotonic() - started)
        if group is None:
            return
        if self.running is None:
            self.running = group
        else:
            try:
                self.running.join(group)
            except Exception as err:  # noqa: BLE001  (a half-merged cache cannot go on: fail its rows, not the server)
                logger.exception("merging %d rows into the running batch failed", len(group.slots))
                for slot in self.running.slots + group.slots:
                    slot.ticket.fail(err)
                self.running, self._running = None, 0
                return
        self._running = len(self.running.slots)
        self.max_running_seen = max(self.max_running_seen, self._running)

    def _prefilled(self, tickets: list[Ticket]) -> Running | None:
        """Prefill `tickets` as one batch and give each its first token; the rows still open, as a batch."""
        served = self.served
        prompts = [t.prepared.prompt for t in tickets]
        wants_router = served.router.available and any(t.prepared.router or t.prepared.prompt_router for t in tickets)
        record = {} if wants_router else None
        echo = any(t.prepared.echo_logprobs is not None for t in tickets)
        done = self.runner.prefill(prompts, [t.prepared.image_hashes for t in tickets], record, full_logits=echo)
        eos = self._eos_token_ids()
        tokenizer = served.processor.tokenizer
        slots = [Slot(t, RowDecoder(t, tokenizer, eos), RowSampler(t.prepared.sampling, self.runner.device))
                 for t in tickets]
        if record:
            self._prompt_cells(slots, record)
        if echo:
            self._echo_logprobs(slots, done.prompt_logits)
        group = Running(done.cache, done.mask, done.lengths.new_zeros(len(slots)), done.lengths, done.deltas, slots)
        group.tokens = self._advance(group, done.logits, record)
        return self._without_finished(group)

    def _step(self) -> None:
        run = self.running
        run = self._without_finished(run)
        if run is None:
            return
        wants_router = self.served.router.available and any(s.ticket.prepared.router for s in run.slots)
        record = {} if wants_router else None
        try:
            logits, run.mask = self.runner.decode(run.tokens, run.cache, run.mask, run.lengths, run.deltas, record)
        except Exception as err:  # noqa: BLE001
            logger.exception("a decode step of %d rows failed", len(run.slots))
            for slot in run.slots:
                slot.ticket.fail(err)
            self.running, self._running = None, 0
            return
        self.steps += 1
        run.lengths = run.lengths + 1
        run.tokens = self._advance(run, logits, record)
        self._without_finished(run)

    def _advance(self, run: Running, logits: torch.Tensor, record: dict | None) -> torch.Tensor:
        """Choose each row's next token from `logits` [B, V], feed it to the row's decoder and send the events."""
        scores = self.runner.scores(logits)
        tokens = scores.argmax(dim=-1)
        for i, slot in enumerate(run.slots):
            chosen = slot.sampler.choose(scores[i])
            if chosen is not None:
                tokens[i] = chosen
        chosen_ids = tokens.tolist()
        weights = _last_weights(record)
        wants_logprobs = [s.ticket.prepared.logprobs for s in run.slots]
        if any(k is not None for k in wants_logprobs):
            logprobs = torch.log_softmax(logits, dim=-1)
            for i, k in enumerate(wants_logprobs):
                if k is not None:
                    run.slots[i].ticket.token_logprobs.append(_entry(logprobs[i], chosen_ids[i], k))
        events = []
        for i, slot in enumerate(run.slots):
            slot.decoder.step(chosen_ids[i], None if weights is None else weights[i])
            if slot.decoder.outbox is not None:
                events.append((slot.ticket, slot.decoder.outbox))
                slot.decoder.outbox = None
        deliver(events)
        return tokens

    def _without_finished(self, run: Running) -> Running | None:
        """Drop the finished and cancelled rows of `run` (the running batch or a new group); None if none stays."""
        keep = []
        for i, slot in enumerate(run.slots):
            if not slot.gone:
                keep.append(i)
            elif slot.ticket.cancelled and not slot.ticket.done and not slot.aborted:
                slot.aborted = slot.decoder.finished = True
                self.cancelled_rows += 1
                slot.ticket.aborted(slot.decoder.tokens)
        if len(keep) == len(run.slots):
            return run
        if run is self.running:
            self._running = len(keep)
        if not keep:
            if run is self.running:
                self.running = None
            return None
        run.keep(keep)
        return run

    def _prompt_cells(self, slots: list[Slot], record: dict) -> None:
        """On request, the prefill's router weights of each prompt text token (image tokens left out)."""
        from tokenizers.decoders import DecodeStream

        layers = sorted(record)
        w_v = torch.stack([record[k][:, :, 0] for k in layers], dim=-1)  # [B, T, L]
        visual = set(self.served.facts.visual_ids)
        for i, slot in enumerate(slots):
            prepared = slot.ticket.prepared
            if not prepared.prompt_router:
                continue
            n = prepared.prompt_tokens
            weights = w_v[i, -n:].float().cpu().tolist()
            stream, cells = DecodeStream(skip_special_tokens=False), []
            for token, layer_weights in zip(prepared.input_ids, weights, strict=True):
                piece = stream.step(slot.decoder.backend, token) or ""
                if token not in visual:
                    cells.append(router_cell(token, piece, layer_weights))
            slot.ticket.push(Delta(prompt_cells=cells))

    def _echo_logprobs(self, slots: list[Slot], prompt_logits: torch.Tensor) -> None:
        """Each prompt token's log-probability given the tokens before it (the first has none), for `echo`."""
        logprobs = torch.log_softmax(prompt_logits, dim=-1)  # [B, T, V]
        T = logprobs.shape[1]
        for i, slot in enumerate(slots):
            k = slot.ticket.prepared.echo_logprobs
            if k is None:
                continue
            ids = slot.ticket.prepared.input_ids
            start = T - len(ids)
            entries = [(ids[0], None, None)]
            for j in range(1, len(ids)):
                entries.append(_entry(logprobs[i, start + j - 1], ids[j], k))
            slot.ticket.prompt_logprobs = entries


def _entry(logprobs: torch.Tensor, token: int, k: int) -> tuple[int, float, list[tuple[int, float]]]:
    """(token, its logprob, the `k` most likely tokens with theirs) from one position's log-probabilities [V]."""
    top = torch.topk(logprobs, k) if k > 0 else None
    best = [] if top is None else list(zip(top.indices.tolist(), top.values.tolist(), strict=True))
    return token, float(logprobs[token]), best


def _last_weights(record: dict | None) -> list[list[float]] | None:
    """w_v of every learner layer at each row's last position: [B][L]."""
    if not record:
        return None
    w_v = torch.stack([record[k][:, -1, 0] for k in sorted(record)], dim=1)
    return w_v.float().cpu().tolist()
