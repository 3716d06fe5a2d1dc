"""`/metrics` in Prometheus' text format, with vLLM's metric names under `wings:` (dashboards built for vLLM carry
over), labelled by `model_name`.

Gauges (read at scrape time): `wings:num_requests_running`, `wings:num_requests_waiting`.
Histograms (seconds, monotonic clock): `wings:time_to_first_token_seconds` (from the request's arrival, its
preparation included, as vLLM measures), `wings:inter_token_latency_seconds`, `wings:e2e_request_latency_seconds`,
`wings:request_queue_time_seconds`.
Counters: `wings:prompt_tokens_total`, `wings:generation_tokens_total`, `wings:request_success_total{finished_reason}`
(stop, length, abort = the client went away), `wings:request_failure_total{status}` (inference requests answered
with an error status, or whose stream ended in an error), `wings:image_feature_cache_hits_total` / `..._misses_total`.

Each `Server` has its own registry, so several servers in one process (tests, notebooks) never share counts.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

# vLLM's buckets (seconds): first token from a few ms to minutes, inter-token from ms to seconds.
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
                40.0, 80.0, 160.0, 640.0, 2560.0)
ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0,
               80.0)
E2E_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0, 480.0,
               960.0, 1920.0, 7680.0)
CONTENT_TYPE = CONTENT_TYPE_LATEST


class ServerMetrics:
    """The server's metrics; the scheduler threads observe tokens and finishes, the HTTP side failures."""

    def __init__(self):
        self.registry = CollectorRegistry(auto_describe=True)
        r, label = self.registry, ["model_name"]
        self.running = Gauge("wings:num_requests_running", "Requests in the running batch (decoding).", label,
                             registry=r)
        self.waiting = Gauge("wings:num_requests_waiting", "Requests waiting to be admitted.", label, registry=r)
        self.ttft = Histogram("wings:time_to_first_token_seconds", "Time from arrival to the first token.", label,
                              buckets=TTFT_BUCKETS, registry=r)
        self.itl = Histogram("wings:inter_token_latency_seconds", "Time between two tokens of a request.", label,
                             buckets=ITL_BUCKETS, registry=r)
        self.e2e = Histogram("wings:e2e_request_latency_seconds", "Time from arrival to the last token.", label,
                             buckets=E2E_BUCKETS, registry=r)
        self.queue = Histogram("wings:request_queue_time_seconds", "Time from submission to admission.", label,
                               buckets=TTFT_BUCKETS, registry=r)
        self.prompt_tokens = Counter("wings:prompt_tokens", "Prompt tokens of finished requests.", label, registry=r)
        self.generation_tokens = Counter("wings:generation_tokens", "Tokens generated.", label, registry=r)
        self.success = Counter("wings:request_success", "Requests that finished, by reason.",
                               [*label, "finished_reason"], registry=r)
        self.failure = Counter("wings:request_failure", "Inference requests that failed, by HTTP status.",
                               [*label, "status"], registry=r)
        self.cache_hits = Counter("wings:image_feature_cache_hits", "Images whose features came from the cache.",
                                  label, registry=r)
        self.cache_misses = Counter("wings:image_feature_cache_misses", "Images encoded (not in the cache).", label,
                                    registry=r)
        self._cache_seen: dict[str, tuple[int, int]] = {}

    def failed(self, model: str, status: int) -> None:
        self.failure.labels(model, str(status)).inc()

    def render(self, schedulers) -> bytes:
        """The exposition text, gauges refreshed from the schedulers first."""
        for scheduler in schedulers:
            name = scheduler.served.name
            self.running.labels(name).set(scheduler.running_count())
            self.waiting.labels(name).set(scheduler.pending_count())
            features = getattr(scheduler, "features", None)
            if features is not None:  # counted by the cache itself: add what is new since the last scrape
                hits, misses = self._cache_seen.get(name, (0, 0))
                self.cache_hits.labels(name).inc(features.hits - hits)
                self.cache_misses.labels(name).inc(features.misses - misses)
                self._cache_seen[name] = (features.hits, features.misses)
        return generate_latest(self.registry)


class RequestTimes:
    """One request's clock and token counts, observed into `ServerMetrics` as its events reach the client side."""

    def __init__(self, metrics: ServerMetrics | None, model: str, arrival: float):
        self.metrics, self.model = metrics, model
        self.arrival = arrival
        self.admitted: float | None = None
        self.first_token: float | None = None
        self.last_token: float | None = None
        self.tokens = 0
        self.finished = False

    def admit(self, now: float, submitted: float) -> None:
        if self.admitted is None:
            self.admitted = now
            if self.metrics is not None:
                self.metrics.queue.labels(self.model).observe(max(0.0, now - submitted))

    def tokens_until(self, count: int, now: float) -> None:
        """The request has `count` tokens generated by `now`."""
        new = count - self.tokens
        if new <= 0:
            return
        m = self.metrics
        if self.first_token is None:
            self.first_token = self.last_token = now
            if m is not None:
                m.ttft.labels(self.model).observe(now - self.arrival)
            new -= 1
        if m is not None and new > 0:
            gap = (now - self.last_token) / new
            for _ in range(new):
                m.itl.labels(self.model).observe(gap)
        self.tokens, self.last_token = count, now

    def finish(self, reason: str, prompt_tokens: int, now: float) -> None:
        if self.finished:
            return
        self.finished = True
        m = self.metrics
        if m is None:
            return
        m.e2e.labels(self.model).observe(now - self.arrival)
        m.prompt_tokens.labels(self.model).inc(prompt_tokens)
        m.generation_tokens.labels(self.model).inc(self.tokens)
        m.success.labels(self.model, reason).inc()
