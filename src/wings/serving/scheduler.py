"""The request queue every scheduler shares, and the wave scheduler (`--scheduler waves`).

One thread owns the model and runs every forward: the Wings hooks keep per-call state on the attention modules, so
two forwards must never overlap on a model. Requests arrive as `Ticket`s (client side: an event loop) and wait in
one bounded queue (429 with Retry-After past `max_queue`, 503 while shutting down).

Two schedulers take them from there:
- `ContinuousScheduler` (engine.py, the default): requests join the running batch between decode steps.
- `WaveScheduler` (here): when free, the thread takes up to `max_batch_size` waiting requests (a *wave*),
  left-pads them into one batch with all their images, and runs `generate` with the learner-aware cache. Each row
  streams to its own client as tokens arrive; a finished or disconnected row is padded from then on while the
  others go on; requests that arrive during a wave wait for the next one. Kept for comparison (benchmarks) and
  for `compat='official'` models, which decode without a KV cache, one request at a time.
  If a batched `generate` raises, the wave's requests that have not streamed anything yet are retried one at a
  time, so a request that fails on its own gets the error and the others their answers.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import logging
import threading
import time
import uuid
from collections import Counter, deque

import torch
from transformers import LogitsProcessorList, StoppingCriteriaList

from .decoding import Delta, Failure, PerRowSampler, RowDecoder, WaveMonitor
from .errors import APIError
from .inputs import Prepared, ServedModel
from .metrics import RequestTimes, ServerMetrics

logger = logging.getLogger("wings.serve")
MAX_GATHER_SECONDS = 0.25
SAMPLING_KEYS = ("do_sample", "temperature", "top_p", "top_k", "min_p", "typical_p", "epsilon_cutoff",
                 "eta_cutoff")


class Ticket:
    """One request between its client (event loop) and the scheduler thread."""

    def __init__(self, prepared: Prepared, loop: asyncio.AbstractEventLoop, times: RequestTimes | None = None):
        self.id = f"chatcmpl-{uuid.uuid4().hex}"
        self.prepared = prepared
        self.loop = loop
        self.queue: asyncio.Queue = asyncio.Queue()
        self.cancelled = False  # set by the client side (disconnect); read by the scheduler thread
        self.emitted = False  # some text or router cells already went to the client
        self.done = False
        self.submitted_at = time.monotonic()
        self.times = times or RequestTimes(None, "", self.submitted_at)
        # Completions with `logprobs`: one (token id, logprob, top [(id, logprob)]) per generated token, and the
        # prompt's (echo), filled by the scheduler thread before the event that ends the request.
        self.token_logprobs: list[tuple[int, float, list[tuple[int, float]]]] = []
        self.prompt_logprobs: list[tuple[int, float | None, list[tuple[int, float]] | None]] | None = None

    def note(self, event: Delta | Failure) -> None:
        """Update the flags the scheduler reads and the request's clock (in the scheduler's thread, before the event
        is handed over)."""
        if isinstance(event, Delta) and (event.text or event.cells):
            self.emitted = True
        if isinstance(event, Delta) and event.finish_reason is not None:
            now = time.monotonic()
            self.times.tokens_until(event.completion_tokens, now)
            self.times.finish(event.finish_reason, self.prepared.prompt_tokens, now)
        if isinstance(event, Failure) or event.finish_reason is not None:
            self.done = True

    def aborted(self, tokens: int) -> None:
        """The client went away after `tokens` tokens (counted as finished_reason "abort", as vLLM does)."""
        now = time.monotonic()
        self.times.tokens_until(tokens, now)
        self.times.finish("abort", self.prepared.prompt_tokens, now)

    def push(self, event: Delta | Failure) -> None:
        self.note(event)
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, event)
        except RuntimeError:  # the event loop is closed: the server is shutting down and nobody listens
            pass

    def cancel(self) -> None:
        self.cancelled = True

    def fail(self, err: BaseException) -> None:
        if self.done:
            return
        if isinstance(err, APIError):
            self.push(Failure(err))
        else:
            self.push(Failure(APIError(500, f"generation failed: {type(err).__name__}: {err}",
                                       code="generation_failed")))


class Scheduler:
    """Owns `served.model`: a queue of tickets and the thread that runs them (`_loop`, in a subclass)."""

    kind = "base"

    def __init__(self, served: ServedModel, max_batch_size: int = 8, max_queue: int = 64,
                 gather_seconds: float = 0.02, metrics: ServerMetrics | None = None):
        if max_batch_size < 1 or max_queue < 1:
            raise ValueError(f"max_batch_size and max_queue must be >= 1, got {max_batch_size} and {max_queue}")
        self.served = served
        # compat='official' decodes without a KV cache and its padding behaviour is the released code's: one
        # request at a time.
        self.max_batch_size = 1 if served.official else max_batch_size
        self.max_queue = max_queue
        # A wave starts once the batch is full or its oldest request has waited `gather_seconds`, and, while
        # requests that arrived meanwhile are still being prepared (images decoded, tokenized), up to
        # `MAX_GATHER_SECONDS`: clients that send together (a burst, an evaluation harness) share the first wave
        # instead of the first one running alone.
        self.gather_seconds = gather_seconds
        self._preparing = 0
        self._running = 0  # rows decoding now (written by the scheduler thread only)
        self._wave: list[Ticket] = []  # the wave being generated (the wave scheduler's running requests)
        self._pending: deque[Ticket] = deque()
        self._cond = threading.Condition()
        self._paused = False
        self._stopping = False
        self._thread: threading.Thread | None = None
        self.batch_sizes: Counter = Counter()  # wave size -> number of waves
        self.cancelled_rows = 0  # rows that stopped early because their client went away
        self._recent_wave_seconds: deque[float] = deque(maxlen=20)
        self.metrics = metrics
        self.failed = False  # the thread died (`/health` then answers 503)

    # --- client side (event loop) ----------------------------------------------------------------------------

    def submit(self, prepared: Prepared, loop: asyncio.AbstractEventLoop, arrival: float | None = None) -> Ticket:
        """Queue a request (`arrival`: when its HTTP request came in, for the time-to-first-token metric)."""
        with self._cond:
            if self._stopping:
                raise APIError(503, "the server is shutting down", code="shutting_down",
                               headers={"Retry-After": "5"})
            if len(self._pending) >= self.max_queue:
                raise APIError(429, f"the server's queue is full ({self.max_queue} requests waiting for model "
                                    f"{self.served.name}); retry shortly", code="queue_full",
                               headers={"Retry-After": str(self.retry_after())})
            times = RequestTimes(self.metrics, self.served.name, arrival if arrival is not None else time.monotonic())
            ticket = Ticket(prepared, loop, times)
            self._pending.append(ticket)
            self._cond.notify()
            return ticket

    @contextlib.contextmanager
    def preparing(self):
        """Around a request's preparation (before `submit`): the next wave waits a little for it."""
        with self._cond:
            self._preparing += 1
        try:
            yield
        finally:
            with self._cond:
                self._preparing -= 1
                self._cond.notify()

    def retry_after(self) -> int:
        """Seconds until the queue has room, guessed from recent waves (at least 1)."""
        recent = sorted(self._recent_wave_seconds)
        typical = recent[len(recent) // 2] if recent else 1.0
        waves_ahead = max(1, len(self._pending) // self.max_batch_size)
        return max(1, round(typical * waves_ahead))

    def pending_count(self) -> int:
        with self._cond:
            return len(self._pending)

    def running_count(self) -> int:
        """Requests decoding now that have not ended: a request's last event marks it done before it is handed to
        its client, so a client that has its answer never sees itself counted (the gauge of /metrics)."""
        return sum(not (t.done or t.cancelled) for t in list(self._wave))

    def idle(self) -> bool:
        """Nothing being prepared, waiting or running (draining waits for this)."""
        with self._cond:
            return not self._pending and self._running == 0 and self._preparing == 0

    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and not self.failed

    def pause(self) -> None:
        """Start no new wave until `resume` (requests keep queueing): for draining and for tests."""
        with self._cond:
            self._paused = True

    def resume(self) -> None:
        with self._cond:
            self._paused = False
            self._cond.notify()

    def stats(self) -> dict:
        waves = sum(self.batch_sizes.values())
        requests = sum(size * n for size, n in self.batch_sizes.items())
        return {"model": self.served.name, "scheduler": self.kind, "waves": waves, "requests": requests,
                "max_batch_size_seen": max(self.batch_sizes, default=0),
                "mean_batch_size": round(requests / waves, 3) if waves else 0.0,
                "cancelled_rows": self.cancelled_rows,
                "waiting": self.pending_count(), "running": self.running_count()}

    # --- lifecycle ------------------------------------------------------------------------------------------

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._guarded_loop, name=f"wings-scheduler-{self.served.name}",
                                            daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        with self._cond:
            self._stopping = True
            self._paused = False
            for ticket in self._pending:
                ticket.fail(APIError(503, "the server is shutting down", code="shutting_down"))
            self._pending.clear()
            self._cond.notify_all()
        for_thread = self._thread
        if for_thread is not None:
            for_thread.join(timeout)

    # --- the model's thread ---------------------------------------------------------------------------------

    def _guarded_loop(self) -> None:
        try:
            self._loop()
        except BaseException:
            self.failed = True
            logger.exception("the scheduler thread of %s died", self.served.name)
            raise

    def _loop(self) -> None:
        raise NotImplementedError

    def _eos_token_ids(self) -> set[int]:
        eos = self.served.model.generation_config.eos_token_id
        ids = set(eos if isinstance(eos, list) else [] if eos is None else [eos])
        tokenizer_eos = self.served.processor.tokenizer.eos_token_id
        if tokenizer_eos is not None:
            ids.add(tokenizer_eos)
        return ids


class WaveScheduler(Scheduler):
    """Waiting requests run together in one batched `generate` (a wave); newcomers wait for the next wave."""

    kind = "waves"

    def _next_wave(self) -> list[Ticket] | None:
        with self._cond:
            while True:
                while not self._stopping and (self._paused or not self._pending):
                    self._cond.wait()
                if self._stopping:
                    return None
                waited = time.monotonic() - self._pending[0].submitted_at
                limit = MAX_GATHER_SECONDS if self._preparing else self.gather_seconds
                if len(self._pending) >= self.max_batch_size or waited >= limit:
                    break
                self._cond.wait(limit - waited)
            wave = []
            while self._pending and len(wave) < self.max_batch_size:
                ticket = self._pending.popleft()
                if ticket.cancelled:  # its client went away while it waited
                    ticket.aborted(0)
                else:
                    wave.append(ticket)
            return wave

    def _loop(self) -> None:
        while (wave := self._next_wave()) is not None:
            if not wave:
                continue
            started = time.monotonic()
            self.batch_sizes[len(wave)] += 1
            self._running, self._wave = len(wave), wave
            for ticket in wave:
                ticket.times.admit(started, ticket.submitted_at)
            try:
                self._generate(wave)
            except Exception as err:  # noqa: BLE001  (isolate the failing request, keep the server alive)
                logger.exception("batched generate of %d requests failed", len(wave))
                self._retry_alone(wave, err)
            self._running, self._wave = 0, []
            self._recent_wave_seconds.append(time.monotonic() - started)

    def _retry_alone(self, wave: list[Ticket], err: Exception) -> None:
        if len(wave) == 1:
            wave[0].fail(err)
            return
        for ticket in wave:
            if ticket.done or ticket.cancelled:
                continue
            if ticket.emitted:  # its client already has part of an answer that a rerun cannot continue exactly
                ticket.fail(err)
                continue
            try:
                self._generate([ticket])
            except Exception as alone:  # noqa: BLE001
                logger.exception("request %s failed on its own", ticket.id)
                ticket.fail(alone)

    def _generate(self, wave: list[Ticket]) -> None:
        served = self.served
        model, tokenizer = served.model, served.processor.tokenizer
        eos = self._eos_token_ids()
        rows = [RowDecoder(ticket, tokenizer, eos) for ticket in wave]
        inputs = served.codec.batch([t.prepared.prompt for t in wave], model.device)  # left-padded, pixels joined
        inputs.pop("position_ids", None)  # generate derives them from the mask
        wants_router = served.router.available and any(t.prepared.router or t.prepared.prompt_router for t in wave)
        record = {} if wants_router else None
        config = copy.deepcopy(model.generation_config)
        config.update(**{k: None for k in SAMPLING_KEYS if k != "do_sample"}, do_sample=False, num_beams=1,
                      num_return_sequences=1, max_new_tokens=max(t.prepared.max_new_tokens for t in wave),
                      max_length=None, eos_token_id=sorted(eos), pad_token_id=tokenizer.pad_token_id,
                      stop_strings=None, return_dict_in_generate=False)
        extra = {"wings_record": record} if record is not None else {}
        with torch.inference_mode():
            model.generate(**inputs, generation_config=config,
                           logits_processor=LogitsProcessorList([PerRowSampler(rows, model.device)]),
                           stopping_criteria=StoppingCriteriaList([WaveMonitor(rows, record,
                                                                               served.facts.visual_ids)]),
                           **extra)
        for row in rows:
            row.close()
            if row.stopped_by_cancel:
                row.ticket.aborted(row.tokens)
        self.cancelled_rows += sum(row.stopped_by_cancel for row in rows)
