"""Question 7: how long the start-up storage probe takes to give up on a dead S3 endpoint, with
the default ``storage.connect_timeout_s`` / ``request_timeout_s`` (the goal: under 30 s).

Three endpoints on 127.0.0.1, no network needed: a closed port (connection refused), a port
that accepts connections and never answers (a hung server), and a port whose accept queue is
full, so its SYNs go unanswered (a firewalled or vanished host).

    PYTHONPATH=. python bench/storage_faults.py
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
import threading
import time
from datetime import date
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from salmap.pipeline.faults import unanswered_port  # noqa: E402
from salmap.pipeline.storage import (  # noqa: E402
    DEFAULT_CONNECT_TIMEOUT_S,
    DEFAULT_REQUEST_TIMEOUT_S,
    PROBE_ATTEMPTS,
    StorageCheckError,
    check_storage,
)


def closed_port() -> tuple[int, list]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1], []


def silent_port() -> tuple[int, list]:
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(64)
    held: list = [server]

    def accept() -> None:
        while True:
            try:
                held.append(server.accept()[0])
            except OSError:
                return

    threading.Thread(target=accept, daemon=True).start()
    return server.getsockname()[1], held


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default=None, help="ignored: no model runs here")
    parser.parse_args()
    os.environ.setdefault("AWS_ACCESS_KEY_ID", "bench")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "bench")
    os.environ.setdefault("AWS_EC2_METADATA_DISABLED", "true")
    print("## 7. Storage faults: time for the start-up probe to give up\n")
    print(f"date {date.today().isoformat()}; defaults connect_timeout_s="
          f"{DEFAULT_CONNECT_TIMEOUT_S:g}, request_timeout_s={DEFAULT_REQUEST_TIMEOUT_S:g}, "
          f"{PROBE_ATTEMPTS} attempts per request\n")
    print("| endpoint | seconds to fail | message starts |")
    print("|---|---|---|")
    for name, make in (("closed port (refused)", closed_port), ("accepts, never answers",
                                                                silent_port),
                       ("SYNs unanswered", unanswered_port)):
        port, keep = make()
        t0 = time.monotonic()
        try:
            check_storage("s3://bucket/runs", {"endpoint": f"http://127.0.0.1:{port}"}, write=True)
            outcome = "passed (unexpected)"
        except StorageCheckError as err:
            outcome = str(err).replace(str(port), "PORT")[:70] + "..."
        print(f"| {name} | {time.monotonic() - t0:.1f} | {outcome} |")
        for s in keep:
            s.close()
    print()


if __name__ == "__main__":
    main()
