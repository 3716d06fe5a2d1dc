"""Run the app with uvicorn: in the foreground (the CLI) or in a background thread (tests, benchmarks, notebooks).

The socket is bound before uvicorn starts, so port 0 gives a free port whose number is known at once.
"""

from __future__ import annotations

import signal
import socket
import threading
import time

import uvicorn


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


def serve_forever(app, sock: socket.socket, log_level: str = "info") -> None:
    """Serve until Ctrl-C or SIGTERM, then shut down cleanly (requests in flight get up to 5 s) and return.

    uvicorn re-raises the signal it stopped on once it is done; both end here as a KeyboardInterrupt."""

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        uvicorn.Server(uvicorn.Config(app, log_level=log_level, timeout_graceful_shutdown=5)).run(sockets=[sock])
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
