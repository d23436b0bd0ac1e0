"""A moto S3 server on 127.0.0.1 that records every request it answers: how tests and benches
count GETs per shard at the server, whatever client made them."""

from __future__ import annotations

import threading
from urllib.parse import unquote

from moto.server import (
    DomainDispatcherApplication,
    MotoRequestHandler,
    ThreadedMotoServer,
    create_backend_app,
)
from werkzeug.serving import make_server


class CountingMotoServer(ThreadedMotoServer):
    """``requests``: ``(method, path, Range header)`` of every request, in order."""

    def __init__(self) -> None:
        import logging

        super().__init__(ip_address="127.0.0.1", port=0, verbose=False)
        logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one log line per request
        self.requests: list[tuple[str, str, str]] = []
        self._lock = threading.Lock()

    def _server_entry(self) -> None:
        app = DomainDispatcherApplication(create_backend_app)

        def counting(environ, start_response):
            with self._lock:
                self.requests.append((environ["REQUEST_METHOD"], unquote(environ["PATH_INFO"]),
                                      environ.get("HTTP_RANGE", "")))
            return app(environ, start_response)

        self._server = make_server(self._ip_address, self._port, counting, True,
                                   request_handler=MotoRequestHandler)
        self._server_ready_event.set()
        self._server.serve_forever()

    @property
    def endpoint(self) -> str:
        host, port = self.get_host_and_port()
        return f"http://{host}:{port}"

    def gets(self, path: str) -> int:
        """GETs of the object at ``/bucket/key``."""
        return sum(m == "GET" and p == path for m, p, _ in self.requests)
