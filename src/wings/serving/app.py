"""The HTTP side: a FastAPI app speaking OpenAI's chat-completions API (JSON and server-sent events), plus the
web page and its few helper routes.

Routes: `POST /v1/chat/completions`, `POST /v1/completions` (completions.py), `GET /v1/models`; operations:
`GET /health` (the process and its scheduler threads are alive), `GET /ready` (models loaded, not draining),
`GET /metrics` (Prometheus, metrics.py); for the page: `GET /` (static page), `GET /wings/info`,
`POST /wings/check-image`, `GET /wings/stats`. With an API key, everything under `/v1` and `/wings` needs
`Authorization: Bearer KEY` (the page, the probes and /metrics stay open). Every response carries an
`X-Request-Id` and every request one access-log line (observability.py).

Draining (SIGTERM, background.py): `/ready` answers 503 at once, new inference requests get 503 with Retry-After,
requests already queued or running finish; the process exits once the schedulers are idle or the grace period
(`--drain-seconds`) is over.
"""

from __future__ import annotations

import asyncio
import hmac
import threading
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass
from importlib import resources

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from openai.types.model import Model
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from .decoding import Delta, Failure
from .engine import ContinuousScheduler
from .errors import APIError, bad_request
from .inputs import ServedModel
from .metrics import CONTENT_TYPE, ServerMetrics
from .observability import AccessRecord, ObservabilityMiddleware
from .protocol import ChatRequest, chunk, completion, parse_body, parse_chat_request, sse, usage
from .scheduler import Scheduler, Ticket, WaveScheduler

DEFAULT_MAX_BODY_BYTES = 100 * 2**20
DISCONNECT_POLL_SECONDS = 0.5


SCHEDULERS = ("continuous", "waves")


@dataclass
class ServerOptions:
    api_key: str | None = None
    max_batch_size: int = 8
    max_queue: int = 64
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    ui: bool = True
    scheduler: str = "continuous"  # or "waves" (scheduler.py): the running batch, or one batched generate at a time
    max_prefill_tokens: int = 4096  # prompt tokens prefilled per iteration of the running batch (engine.py)
    image_cache_size: int = 256  # images whose projected features are kept (features.py); 0: off
    drain_seconds: float = 30.0  # on SIGTERM, how long requests in flight may take to finish


class Server:
    """The served models (a main one and, in compare mode, a baseline), each with its own scheduler thread."""

    def __init__(self, models: list[ServedModel], options: ServerOptions | None = None, compare: bool = False):
        if not models:
            raise ValueError("serve at least one model")
        names = [m.name for m in models]
        if len(set(names)) != len(names):
            raise ValueError(f"served model names must differ, got {names}; use --served-model-name/--compare-name")
        self.options = options or ServerOptions()
        if self.options.scheduler not in SCHEDULERS:
            raise ValueError(f"scheduler must be one of {SCHEDULERS}, got {self.options.scheduler!r}")
        self.metrics = ServerMetrics()
        self.models = {m.name: m for m in models}
        self.schedulers = {m.name: self._scheduler(m) for m in models}
        self.compare = (names[0], names[1]) if compare and len(names) > 1 else None
        self.default = names[0]
        self.started = False
        self.draining = threading.Event()

    def _scheduler(self, served: ServedModel) -> Scheduler:
        o = self.options
        if o.scheduler == "waves" or served.official:  # official compat: no KV cache, one request at a time
            return WaveScheduler(served, o.max_batch_size, o.max_queue, metrics=self.metrics)
        return ContinuousScheduler(served, o.max_batch_size, o.max_queue, metrics=self.metrics,
                                   max_prefill_tokens=o.max_prefill_tokens, image_cache_size=o.image_cache_size)

    def check_accepting(self) -> None:
        if self.draining.is_set():
            raise APIError(503, "the server is draining (shutting down); retry on another replica", code="draining",
                           headers={"Retry-After": str(max(1, round(self.options.drain_seconds)))})

    def begin_drain(self) -> None:
        """Stop taking inference requests (`/ready` fails); those already accepted go on."""
        self.draining.set()

    def idle(self) -> bool:
        return all(s.idle() for s in self.schedulers.values())

    def alive(self) -> bool:
        return all(s.alive() for s in self.schedulers.values())

    def model_for(self, name: str | None) -> tuple[ServedModel, Scheduler]:
        name = name or self.default
        if name not in self.models:
            raise APIError(404, f"the model {name!r} does not exist; this server serves {sorted(self.models)}",
                           param="model", code="model_not_found")
        return self.models[name], self.schedulers[name]

    def authorize(self, request: Request) -> None:
        key = self.options.api_key
        if not key:
            return
        header = request.headers.get("authorization", "")
        scheme, _, given = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), key.encode()):
            raise APIError(401, "missing or incorrect API key: send `Authorization: Bearer <key>`",
                           code="invalid_api_key")

    def start(self) -> None:
        for scheduler in self.schedulers.values():
            scheduler.start()
        self.started = True

    def stop(self) -> None:
        for scheduler in self.schedulers.values():
            scheduler.stop()


def create_app(server: Server) -> FastAPI:
    @asynccontextmanager
    async def lifespan(_app: FastAPI):
        server.start()
        try:
            yield
        finally:
            server.stop()

    app = FastAPI(title="wings serve", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.server = server
    app.add_middleware(ObservabilityMiddleware, server=server)

    @app.exception_handler(APIError)
    async def _api_error(_request: Request, err: APIError):
        return JSONResponse(err.body(), status_code=err.status, headers=err.headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_request: Request, err: StarletteHTTPException):
        return JSONResponse(APIError(err.status_code, str(err.detail)).body(), status_code=err.status_code)

    @app.exception_handler(Exception)
    async def _unexpected(_request: Request, err: Exception):
        return JSONResponse(APIError(500, f"internal error: {type(err).__name__}: {err}").body(), status_code=500)

    @app.get("/health")
    async def health():
        """Liveness: the process answers and every scheduler thread runs."""
        if server.started and not server.alive():
            return JSONResponse({"status": "error", "reason": "a scheduler thread is not running"}, status_code=503)
        return {"status": "ok"}

    @app.get("/ready")
    async def ready():
        """Readiness: the models are loaded and the server takes requests (not draining)."""
        if server.draining.is_set():
            return JSONResponse({"status": "draining"}, status_code=503)
        if not server.started or not server.alive():
            return JSONResponse({"status": "starting" if not server.started else "error"}, status_code=503)
        return {"status": "ready", "models": sorted(server.models)}

    @app.get("/metrics")
    async def metrics():
        return Response(server.metrics.render(server.schedulers.values()), media_type=CONTENT_TYPE)

    @app.get("/v1/models")
    async def models(request: Request):
        server.authorize(request)
        created = int(time.time())
        data = [Model(id=name, created=created, object="model", owned_by="wings").model_dump()
                for name in server.models]
        return {"object": "list", "data": data}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        arrival = time.monotonic()
        access: AccessRecord = request.state.access
        server.authorize(request)
        server.check_accepting()
        body = parse_body(await read_body(request, server.options.max_body_bytes))
        chat = parse_chat_request(body)
        served, scheduler = server.model_for(chat.model)
        access.model, access.stream = served.name, chat.stream
        with scheduler.preparing():
            prepared = await run_in_threadpool(served.prepare, chat)
            ticket = scheduler.submit(prepared, asyncio.get_running_loop(), arrival)
        if chat.stream:
            return StreamingResponse(stream_events(ticket, chat, served, access), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        return JSONResponse(await collect(ticket, chat, served, request, access))

    @app.post("/v1/completions")
    async def completions(request: Request):
        from .completions import parse_completion_request
        from .text_completions import answer_completions

        arrival = time.monotonic()
        server.authorize(request)
        server.check_accepting()
        body = parse_body(await read_body(request, server.options.max_body_bytes))
        parsed = parse_completion_request(body)
        served, scheduler = server.model_for(parsed.model)
        return await answer_completions(parsed, served, scheduler, request, arrival)

    @app.get("/wings/info")
    async def info(request: Request):
        server.authorize(request)
        compare = {"main": server.compare[0], "baseline": server.compare[1]} if server.compare else None
        return {"models": [m.info() for m in server.models.values()], "compare": compare}

    @app.post("/wings/check-image")
    async def check_image(request: Request):
        """Open an image as a chat request would (same policy and limits), so the page can refuse it on attach."""
        server.authorize(request)
        body = parse_body(await read_body(request, server.options.max_body_bytes))
        url, name = body.get("url"), body.get("model")
        if not isinstance(url, str):
            raise bad_request("`url` must be a string (a data URL)", param="url")
        if name is not None and not isinstance(name, str):
            raise bad_request("`model` must be a string (a served model's name)", param="model")
        served, _ = server.model_for(name)
        image = await run_in_threadpool(served.open_image, url, "image")
        return {"ok": True, "width": image.width, "height": image.height}

    @app.get("/wings/stats")
    async def stats(request: Request):
        server.authorize(request)
        return {"schedulers": [s.stats() for s in server.schedulers.values()]}

    if server.options.ui:
        web = resources.files("wings.serving") / "web"

        @app.get("/")
        async def page():
            return FileResponse(str(web / "index.html"), media_type="text/html")

        app.mount("/static", StaticFiles(directory=str(web)), name="static")
    return app


async def read_body(request: Request, limit: int) -> bytes:
    """The body, refused with a 413 past `limit` bytes (checked as it arrives, not after)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise APIError(413, f"the request body is {int(declared):,} bytes, over the limit of {limit:,}")
    chunks, size = [], 0
    async for part in request.stream():
        size += len(part)
        if size > limit:
            raise APIError(413, f"the request body is over the limit of {limit:,} bytes")
        chunks.append(part)
    return b"".join(chunks)


def _extension(chat: ChatRequest, served: ServedModel, delta: Delta | None = None, first: bool = False) -> dict:
    """The `wings` field of a response or chunk: router status first, then router cells as they come."""
    if not (chat.wings_router or chat.wings_prompt_router):
        return {}
    ext: dict = {}
    if first:
        ext["router"] = served.router.as_dict()
    if delta is not None and delta.cells:
        ext["tokens"] = delta.cells
    if delta is not None and delta.prompt_cells is not None:
        ext["prompt_tokens"] = delta.prompt_cells
    return ext


async def stream_events(ticket: Ticket, chat: ChatRequest, served: ServedModel, access: AccessRecord | None = None):
    """Server-sent events: a role chunk, content chunks as rows advance, the finish chunk, usage, [DONE]."""
    created = int(time.time())
    finish = None
    try:
        yield chunk(ticket.id, served.name, created, role="assistant", content="",
                    extension=_extension(chat, served, first=True))
        while True:
            event = await ticket.queue.get()
            if isinstance(event, Failure):
                if access is not None:
                    access.error_status = event.error.status
                yield sse(event.error.body())
                break
            ext = _extension(chat, served, event)
            if event.text or ext:
                yield chunk(ticket.id, served.name, created, content=event.text, extension=ext)
            if event.finish_reason is not None:
                finish = event.finish_reason
                yield chunk(ticket.id, served.name, created, finish_reason=event.finish_reason)
                if chat.stream_options is not None and chat.stream_options.include_usage:
                    use = usage(ticket.prepared.prompt_tokens, event.completion_tokens)
                    yield chunk(ticket.id, served.name, created, use=use, no_choices=True)
                break
        yield sse("[DONE]")
    finally:
        ticket.cancel()  # a no-op once finished; on a disconnect the scheduler stops spending steps on it
        if access is not None:
            access.note_ticket(ticket, finish if finish is not None else None if ticket.done else "abort")


async def wait_event(ticket: Ticket, request: Request):
    """The ticket's next event; a client that disconnects meanwhile cancels its row (a 499 nobody receives)."""
    while True:
        try:
            return await asyncio.wait_for(ticket.queue.get(), DISCONNECT_POLL_SECONDS)
        except TimeoutError:
            if await request.is_disconnected():
                ticket.cancel()
                raise APIError(499, "the client closed the connection") from None


async def collect(ticket: Ticket, chat: ChatRequest, served: ServedModel, request: Request,
                  access: AccessRecord | None = None) -> dict:
    """The whole answer; a client that disconnects meanwhile cancels its row."""
    text, cells, prompt_cells = [], [], None
    event = None
    try:
        while True:
            event = await wait_event(ticket, request)
            if isinstance(event, Failure):
                raise event.error
            text.append(event.text)
            cells.extend(event.cells or [])
            if event.prompt_cells is not None:
                prompt_cells = event.prompt_cells
            if event.finish_reason is not None:
                break
    finally:
        ticket.cancel()
        if access is not None:
            reason = event.finish_reason if isinstance(event, Delta) else None
            access.note_ticket(ticket, reason if reason is not None else None if ticket.done else "abort")
    extension = _extension(chat, served, first=True)
    if extension:
        extension["tokens"] = cells
        if prompt_cells is not None:
            extension["prompt_tokens"] = prompt_cells
    return completion(ticket.id, served.name, "".join(text), event.finish_reason,
                      usage(ticket.prepared.prompt_tokens, event.completion_tokens), extension)
