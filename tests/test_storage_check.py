"""The start-up storage probe: each way a store can be unusable is one clear line, fast."""

from __future__ import annotations

import socket
import threading
import time
from importlib import metadata

import pytest
from conftest import small_config
from salmap.pipeline.faults import unanswered_port
from salmap.pipeline.storage import StorageCheckError, check_storage


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def silent_endpoint():
    """Accepts connections and never answers (a hung server, or a port that is not S3)."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(64)
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        server.settimeout(0.2)
        while not stop.is_set():
            try:
                held.append(server.accept()[0])
            except OSError:
                pass

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.getsockname()[1]}"
    stop.set()
    thread.join()
    for conn in held:
        conn.close()
    server.close()


@pytest.fixture
def unanswered_endpoint():
    """A port whose SYNs go unanswered (its accept queue is full), like a firewalled host."""
    port, held = unanswered_port()
    yield f"http://127.0.0.1:{port}"
    for sock in held:
        sock.close()


@pytest.fixture
def moto():
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    import boto3

    boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1").create_bucket(Bucket="out")
    yield endpoint
    server.stop()


@pytest.fixture
def enforce_auth(monkeypatch):
    """moto checks credentials from now on (it accepts any by default)."""
    from moto import settings
    from moto.core.authorization import ActionAuthenticatorMixin

    monkeypatch.setattr(settings, "INITIAL_NO_AUTH_ACTION_COUNT", 0)
    monkeypatch.setattr(ActionAuthenticatorMixin, "request_count", 0)


def _fails(uri: str, storage: dict, **kw) -> tuple[str, float]:
    t0 = time.monotonic()
    with pytest.raises(StorageCheckError) as info:
        check_storage(uri, storage, **kw)
    message = str(info.value)
    assert "\n" not in message and "Traceback" not in message
    return message, time.monotonic() - t0


def test_a_dead_endpoint_fails_fast_with_the_defaults():
    endpoint = f"http://127.0.0.1:{_closed_port()}"
    message, elapsed = _fails("s3://out/runs", {"endpoint": endpoint}, write=True)
    assert elapsed < 30
    assert f"cannot connect to {endpoint} for s3://out/runs (run.output)" in message
    assert "is the endpoint down" in message and "storage.endpoint" in message


def test_a_silent_endpoint_fails_after_the_request_timeout(silent_endpoint):
    storage = {"endpoint": silent_endpoint, "request_timeout_s": 0.5}
    message, elapsed = _fails("s3://data/wds", storage, key="input.shards")
    assert elapsed < 10
    assert f"{silent_endpoint} accepted the connection for s3://data/wds (input.shards)" in message
    assert "storage.request_timeout_s=0.5" in message


def test_the_jobs_filesystem_uses_the_same_timeouts(silent_endpoint):
    from salmap.pipeline.storage import s3_filesystem

    fs = s3_filesystem({"endpoint": silent_endpoint, "request_timeout_s": 0.5, "retries": 1})
    t0 = time.monotonic()
    with pytest.raises(OSError, match="Timeout"):
        fs.get_file_info("bucket")
    assert time.monotonic() - t0 < 2.0  # pyarrow's own default would wait 3 s


def test_an_unreachable_endpoint_fails_after_the_connect_timeout(unanswered_endpoint):
    storage = {"endpoint": unanswered_endpoint, "connect_timeout_s": 0.5}
    message, elapsed = _fails("s3://out/runs", storage, write=True)
    assert elapsed < 10
    assert message.startswith(f"cannot connect to {unanswered_endpoint} for s3://out/runs "
                              "(run.output): no answer within storage.connect_timeout_s=0.5 s")


def test_a_missing_bucket(moto):
    message, _ = _fails("s3://nope/runs", {"endpoint": moto}, write=True)
    assert message == (f"bucket 'nope' does not exist at {moto} (run.output=s3://nope/runs); "
                       "create it, or fix run.output or storage.endpoint")


def test_rejected_credentials(moto, enforce_auth):
    message, _ = _fails("s3://out/runs", {"endpoint": moto}, write=True)
    assert f"{moto} rejected the S3 credentials for s3://out/runs (run.output): " \
           "InvalidAccessKeyId" in message
    assert "AWS_ACCESS_KEY_ID" in message


def test_no_credentials(moto, monkeypatch, tmp_path):
    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    message, _ = _fails("s3://out/runs", {"endpoint": moto}, write=True)
    assert message.startswith("no S3 credentials found for s3://out/runs (run.output)")
    check_storage("s3://out/wds", {"endpoint": moto}, key="input.shards")  # anonymous reads


def test_credentials_without_write_permission(moto, monkeypatch):
    import boto3
    from botocore.exceptions import ClientError

    iam = boto3.client("iam", endpoint_url=moto, region_name="us-east-1")
    iam.create_user(UserName="reader")
    # A read-only user. On AWS, listing a bucket (ListObjectsV2) needs s3:ListBucket; moto 5.2
    # evaluates the policy against the operation's own name (s3:ListObjectsV2), so the policy
    # grants the read families by wildcard, valid on both: s3:List* and s3:Get*, no s3:Put*.
    iam.put_user_policy(UserName="reader", PolicyName="read", PolicyDocument=(
        '{"Version": "2012-10-17", "Statement": [{"Effect": "Allow", '
        '"Action": ["s3:List*", "s3:Get*"], "Resource": "*"}]}'))
    key = iam.create_access_key(UserName="reader")["AccessKey"]
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", key["AccessKeyId"])
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", key["SecretAccessKey"])
    from moto import settings
    from moto.core.authorization import ActionAuthenticatorMixin

    # moto enforces IAM only after INITIAL_NO_AUTH_ACTION_COUNT requests (default: never)
    monkeypatch.setattr(settings, "INITIAL_NO_AUTH_ACTION_COUNT", 0)
    monkeypatch.setattr(ActionAuthenticatorMixin, "request_count", 0)
    # The premise, checked with boto3 before salmap is asked: this user may read, not write.
    s3 = boto3.client("s3", endpoint_url=moto, region_name="us-east-1",
                      aws_access_key_id=key["AccessKeyId"],
                      aws_secret_access_key=key["SecretAccessKey"])
    try:
        s3.list_objects_v2(Bucket="out", Prefix="wds/")
    except ClientError as err:  # pragma: no cover - says why on another moto
        pytest.fail(f"moto {metadata.version('moto')} denies the read-only user a listing "
                    f"({err}): its IAM evaluation changed; see constraints-lock.txt for the "
                    "version this test is pinned to")
    with pytest.raises(ClientError, match="AccessDenied"):
        s3.put_object(Bucket="out", Key="runs/probe", Body=b"x")
    check_storage("s3://out/wds", {"endpoint": moto}, key="input.shards")  # may read
    message, _ = _fails("s3://out/runs", {"endpoint": moto}, write=True)
    assert f"access denied to s3://out/runs (run.output) at {moto}" in message
    assert "grant s3:ListBucket, s3:PutObject and s3:DeleteObject" in message


def test_a_usable_bucket_passes_and_keeps_no_probe(moto):
    import boto3

    check_storage("s3://out/runs", {"endpoint": moto}, write=True)
    listed = boto3.client("s3", endpoint_url=moto, region_name="us-east-1").list_objects_v2(
        Bucket="out")
    assert listed.get("KeyCount", 0) == 0


def test_a_local_output_that_cannot_be_a_folder(tmp_path):
    (tmp_path / "file").write_text("x")
    message, _ = _fails(str(tmp_path / "file" / "runs"), None, write=True)
    assert message.startswith(f"cannot write to {tmp_path / 'file' / 'runs'} (run.output)")
    check_storage(str(tmp_path / "runs"), None, write=True)


@pytest.mark.parametrize("failure, code", [("dead endpoint", 1), ("missing bucket", 2)])
def test_the_cli_prints_one_line_before_any_work(tmp_path, capsys, moto, failure, code):
    """A dead endpoint may come back (exit 1: schedulers retry); a missing bucket needs a
    person (exit 2, like a config error)."""
    from salmap.pipeline.cli import main

    endpoint = f"http://127.0.0.1:{_closed_port()}" if failure == "dead endpoint" else moto
    job = tmp_path / "job.yaml"
    job.write_text(small_config(["s3://data/wds/shard-000000.tar"], "s3://nope/runs",
                                storage={"endpoint": endpoint}))
    t0 = time.monotonic()
    assert main(["run", str(job)]) == code
    assert time.monotonic() - t0 < 30
    err = capsys.readouterr().err.strip().splitlines()
    expected = {"dead endpoint": f"cannot connect to {endpoint}",
                "missing bucket": f"bucket 'nope' does not exist at {endpoint}"}[failure]
    assert len(err) == 1 and err[0].startswith(f"salmap: storage error: {expected}")
