"""Request ids, the access log and failure counts: an ASGI middleware around the whole app.

- `X-Request-Id`: a client's id is kept (printable ASCII, at most 128 characters; anything else is replaced), else a
  fresh uuid4 hex is made; it is echoed in the response headers and logged.
- Access log: one JSON line per request on the `wings.access` logger, written when the response has been sent
  (for a stream, after its last event): request id, method, path, status, model, prompt and completion tokens,
  images, time to first token, total time, finish reason, whether it streamed. Never the prompt or the answer.
  Probes (`/health`, `/ready`, `/metrics`) and the page's static files are not logged.
- `wings:request_failure_total{status}`: inference requests (`/v1/chat/completions`, `/v1/completions`) answered
  with a 4xx/5xx status, or whose stream ended in an error event (counted with that error's status). A client
  that disconnects is not a failure: the scheduler counts it as finished_reason "abort".
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from dataclasses import asdict, dataclass, field

access_logger = logging.getLogger("wings.access")
INFERENCE_PATHS = ("/v1/chat/completions", "/v1/completions")
QUIET_PATHS = ("/health", "/ready", "/metrics", "/static/")
MAX_ID_LENGTH = 128


@dataclass
class AccessRecord:
    """What one request's log line says; handlers fill in what they learn (`request.state.access`)."""

    request_id: str
    method: str
    path: str
    status: int = 0
    model: str | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    images: int | None = None
    ttft_s: float | None = None
    e2e_s: float = 0.0
    finish_reason: str | None = None
    stream: bool | None = None
    error_status: int | None = None  # an error inside a stream that had answered 200
    started: float = field(default_factory=time.monotonic, repr=False)

    def line(self) -> str:
        data = {k: v for k, v in asdict(self).items() if v is not None and k not in ("started", "error_status")}
        if self.error_status is not None:
            data["error_status"] = self.error_status
        return json.dumps(data, separators=(",", ":"))

    def note_ticket(self, ticket, finish_reason: str | None) -> None:
        """Tokens, times and the finish reason of the request's ticket (the scheduler thread is done with it)."""
        times = ticket.times
        self.prompt_tokens = (self.prompt_tokens or 0) + ticket.prepared.prompt_tokens
        self.completion_tokens = (self.completion_tokens or 0) + times.tokens
        self.images = (self.images or 0) + ticket.prepared.n_images
        if times.first_token is not None and self.ttft_s is None:
            self.ttft_s = round(times.first_token - times.arrival, 6)
        self.finish_reason = finish_reason or self.finish_reason


def request_id_of(headers: list[tuple[bytes, bytes]]) -> str:
    for name, value in headers:
        if name.lower() == b"x-request-id":
            try:
                given = value.decode("ascii")
            except UnicodeDecodeError:
                break
            if 0 < len(given) <= MAX_ID_LENGTH and given.isprintable():
                return given
            break
    return uuid.uuid4().hex


class ObservabilityMiddleware:
    """Request id in and out, one access-log line per request, failures counted (see the module docstring)."""

    def __init__(self, app, server):
        self.app = app
        self.server = server

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope.get("path", "")
        record = AccessRecord(request_id_of(scope.get("headers", [])), scope.get("method", ""), path)
        scope.setdefault("state", {})["access"] = record
        rid = record.request_id.encode()

        async def send_with_id(message):
            if message["type"] == "http.response.start":
                record.status = message["status"]
                message = {**message, "headers": [*message.get("headers", []), (b"x-request-id", rid)]}
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            self._finish(record, path)

    def _finish(self, record: AccessRecord, path: str) -> None:
        record.e2e_s = round(time.monotonic() - record.started, 6)
        if path in INFERENCE_PATHS:
            status = record.error_status or (record.status if record.status >= 400 else None)
            if status is not None and status != 499:
                self.server.metrics.failed(record.model or self.server.default, status)
        if not path.startswith(QUIET_PATHS):
            access_logger.info(record.line())
