"""A moto S3 endpoint on loopback that logs every HTTP request it serves: the honest count of
what salmap asks of a real S3 API (pyarrow and boto3 clients alike), counted at the server.

Two faces of one server: :class:`CountingS3` (``with CountingS3() as s3:``, buckets made,
``s3.log`` by S3 operation) for the commit protocol, and :class:`CountingMotoServer`
(``start()``/``stop()``, ``requests`` as ``(method, path, Range)``) for shard reads.
"""

from __future__ import annotations

import threading
from collections import Counter
from dataclasses import dataclass, field
from urllib.parse import unquote


def _kind(method: str, query: str) -> str:
    """A request's S3 operation in short: GET, HEAD, PUT, LIST, DELETE, MPU-CREATE/PART/COMPLETE."""
    q = query or ""
    if method == "POST" and "uploads" in q and "uploadId" not in q:
        return "MPU-CREATE"
    if method == "PUT" and "uploadId" in q:
        return "MPU-PART"
    if method == "POST" and "uploadId" in q:
        return "MPU-COMPLETE"
    if method == "GET" and ("list-type" in q or "prefix=" in q or "delimiter" in q):
        return "LIST"
    return method


@dataclass
class RequestLog:
    """The requests served, in order: (kind, path), and (method, path, Range header)."""

    entries: list[tuple[str, str]] = field(default_factory=list)
    raw: list[tuple[str, str, str]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, kind: str, path: str, method: str = "", byte_range: str = "") -> None:
        """Log one request."""
        with self.lock:
            self.entries.append((kind, path))
            self.raw.append((method or kind, unquote(path), byte_range))

    def mark(self) -> int:
        """A position in the log, for :meth:`since`."""
        with self.lock:
            return len(self.entries)

    def since(self, mark: int) -> list[tuple[str, str]]:
        """The (kind, path) of the requests after ``mark``."""
        with self.lock:
            return list(self.entries[mark:])

    def counts(self, mark: int = 0, under: str = "") -> Counter[str]:
        """Requests by kind since ``mark`` (only those whose path contains ``under``)."""
        return Counter(k for k, p in self.since(mark) if under in p)


def _serve(log: RequestLog):
    """A threaded moto server on a free loopback port that logs each request into ``log``:
    (server, thread, endpoint URL)."""
    import logging

    from moto.server import DomainDispatcherApplication, MotoRequestHandler, create_backend_app
    from werkzeug.serving import make_server

    class Quiet(MotoRequestHandler):
        def log(self, *args, **kwargs) -> None:  # no line per request on stderr
            pass

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    app = DomainDispatcherApplication(create_backend_app)

    def counted(environ, start_response):
        method = environ["REQUEST_METHOD"]
        kind = _kind(method, environ.get("QUERY_STRING", ""))
        if kind == "PUT" and environ.get("HTTP_IF_NONE_MATCH") == "*":
            kind = "PUT-IF-NONE-MATCH"  # a conditional create
        log.add(kind, environ.get("PATH_INFO", ""), method, environ.get("HTTP_RANGE", ""))
        return app(environ, start_response)

    server = make_server("127.0.0.1", 0, counted, threaded=True, request_handler=Quiet)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    return server, thread, f"http://127.0.0.1:{server.server_address[1]}"


class CountingS3:
    """``with CountingS3() as s3:`` a threaded moto server; ``s3.storage`` for salmap's config,
    ``s3.log`` the requests it served."""

    def __init__(self, buckets: tuple[str, ...] = ("bkt",)) -> None:
        self.buckets = buckets
        self.log = RequestLog()

    def __enter__(self) -> CountingS3:
        self.server, self.thread, self.endpoint = _serve(self.log)
        self.storage = {"endpoint": self.endpoint, "region": "us-east-1"}
        import boto3

        client = boto3.client("s3", endpoint_url=self.endpoint, region_name="us-east-1")
        for b in self.buckets:
            client.create_bucket(Bucket=b)
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()


class CountingMotoServer:
    """``start()``, then ``requests``: ``(method, path, Range header)`` of every request, in
    order; ``gets(path)`` counts the GETs of one object."""

    def __init__(self) -> None:
        self.log = RequestLog()

    def start(self) -> None:
        """Serve on a free loopback port."""
        self._server, self._thread, self.endpoint = _serve(self.log)

    def stop(self) -> None:
        """Shut the server down."""
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()

    def get_host_and_port(self) -> tuple[str, int]:
        """(host, port) it listens on."""
        host, port = self._server.server_address[:2]
        return str(host), int(port)

    @property
    def requests(self) -> list[tuple[str, str, str]]:
        """``(method, path, Range header)`` of every request so far."""
        with self.log.lock:
            return list(self.log.raw)

    def gets(self, path: str) -> int:
        """GETs of the object at ``/bucket/key``."""
        return sum(m == "GET" and p == path for m, p, _ in self.requests)
