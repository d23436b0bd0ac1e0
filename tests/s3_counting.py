"""A moto S3 endpoint on loopback that logs every HTTP request it serves: the honest count of
what the driver asks of a real S3 API (pyarrow and boto3 clients alike)."""

from __future__ import annotations

import threading
from collections import Counter
from dataclasses import dataclass, field


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
    """The requests served, in order: (kind, path)."""

    entries: list[tuple[str, str]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, kind: str, path: str) -> None:
        with self.lock:
            self.entries.append((kind, path))

    def mark(self) -> int:
        with self.lock:
            return len(self.entries)

    def since(self, mark: int) -> list[tuple[str, str]]:
        with self.lock:
            return list(self.entries[mark:])

    def counts(self, mark: int = 0, under: str = "") -> Counter[str]:
        """Requests by kind since ``mark`` (only those whose path contains ``under``)."""
        return Counter(k for k, p in self.since(mark) if under in p)


class CountingS3:
    """``with CountingS3() as s3:`` a threaded moto server; ``s3.storage`` for salmap's config,
    ``s3.log`` the requests it served."""

    def __init__(self, buckets: tuple[str, ...] = ("bkt",)) -> None:
        self.buckets = buckets
        self.log = RequestLog()

    def __enter__(self) -> CountingS3:
        from moto.server import DomainDispatcherApplication, create_backend_app
        from werkzeug.serving import WSGIRequestHandler, make_server

        class Quiet(WSGIRequestHandler):
            def log(self, *args, **kwargs) -> None:  # no line per request on stderr
                pass

        app = DomainDispatcherApplication(create_backend_app)
        log = self.log

        def counted(environ, start_response):
            kind = _kind(environ["REQUEST_METHOD"], environ.get("QUERY_STRING", ""))
            if kind == "PUT" and environ.get("HTTP_IF_NONE_MATCH") == "*":
                kind = "PUT-IF-NONE-MATCH"  # a conditional create
            log.add(kind, environ.get("PATH_INFO", ""))
            return app(environ, start_response)

        self.server = make_server("127.0.0.1", 0, counted, threaded=True,
                                  request_handler=Quiet)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.storage = {"endpoint": self.endpoint, "region": "us-east-1"}
        import boto3

        client = boto3.client("s3", endpoint_url=self.endpoint, region_name="us-east-1")
        for b in self.buckets:
            client.create_bucket(Bucket=b)
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()
