"""Run the app with uvicorn: in the foreground (the CLI) or in a background thread (tests, benchmarks, notebooks).

The socket is bound before uvicorn starts, so port 0 gives a free port whose number is known at once.

SIGTERM drains (what an orchestrator sends before it kills a replica): `/ready` fails and new inference requests
get 503 with Retry-After at once, requests already queued or streaming go on until the schedulers are idle or
`drain_seconds` have passed, then uvicorn shuts down (connections still open get 1 s more) and the process exits
0. Ctrl-C (SIGINT), or a second SIGTERM, stops at once as before.
"""

from __future__ import annotations

import logging
import signal
import socket
import sys
import threading
import time

import uvicorn

DRAIN_POLL_SECONDS = 0.05


def bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as err:
        sock.close()
        raise OSError(f"cannot listen on {host}:{port}: {err.strerror or err}") from None
    sock.listen(2048)  # from here on, connections wait in the backlog until uvicorn accepts them (none is refused)
    sock.set_inheritable(True)
    return sock


def url_of(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


class DrainingServer(uvicorn.Server):
    """uvicorn's server, whose first SIGTERM drains `drain` (a `serving.Server`) before it stops."""

    def __init__(self, config: uvicorn.Config, drain=None):
        super().__init__(config)
        self.drain = drain
        self._draining = False

    def handle_exit(self, sig: int, frame) -> None:
        if sig != signal.SIGTERM or self.drain is None or self._draining:
            return super().handle_exit(sig, frame)
        self._draining = True
        self._captured_signals.append(sig)  # re-raised once uvicorn is done: the process then exits 0 (below)
        self.drain.begin_drain()
        threading.Thread(target=self._wait_then_exit, name="wings-serve-drain", daemon=True).start()

    def _wait_then_exit(self) -> None:
        deadline = time.monotonic() + self.drain.options.drain_seconds
        while time.monotonic() < deadline and not self.drain.idle():
            time.sleep(DRAIN_POLL_SECONDS)
        time.sleep(DRAIN_POLL_SECONDS)  # the last events reach their clients
        self.should_exit = True


def access_log_to_stderr(log_level: str) -> None:
    """The JSON access lines (observability.py) on stderr, one per line, at log level info and below."""
    logger = logging.getLogger("wings.access")
    if not any(getattr(h, "_wings", False) for h in logger.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(message)s"))
        handler._wings = True
        logger.addHandler(handler)
    logger.propagate = False
    logger.setLevel(logging.INFO if log_level in ("info", "debug", "trace") else logging.WARNING)


def serve_forever(app, sock: socket.socket, log_level: str = "info", drain=None) -> None:
    """Serve until Ctrl-C or SIGTERM (which drains `drain`, a `serving.Server`, first), then shut down and return.

    uvicorn re-raises the signal it stopped on once it is done; both end here as a KeyboardInterrupt."""

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    access_log_to_stderr(log_level)
    previous = signal.signal(signal.SIGTERM, interrupt)
    grace = 1 if drain is not None else 5  # after a drain, what is still open has had its time
    try:
        config = uvicorn.Config(app, log_level=log_level, timeout_graceful_shutdown=grace, access_log=False)
        DrainingServer(config, drain).run(sockets=[sock])
    except KeyboardInterrupt:
        pass
    finally:
        signal.signal(signal.SIGTERM, previous)


class BackgroundServer:
    """`with BackgroundServer(app) as server: server.url`: uvicorn on 127.0.0.1 and a free port, in a thread."""

    def __init__(self, app, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning"):
        self.sock = bind(host, port)
        self.url = url_of(self.sock)
        self._server = uvicorn.Server(uvicorn.Config(app, log_level=log_level, timeout_graceful_shutdown=2))
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [self.sock]},
                                        name="wings-serve-http", daemon=True)

    def __enter__(self) -> BackgroundServer:
        self._thread.start()
        deadline = time.monotonic() + 60
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the server at {self.url} did not start")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        self._server.should_exit = True
        self._thread.join(30)
        self.sock.close()

    def __exit__(self, *exc) -> None:
        self.stop()
