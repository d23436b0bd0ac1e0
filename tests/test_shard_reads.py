"""Shard reads against a real S3 API: GETs counted at the server (one per shard, however
large), a broken body resumed by range; hostile member names and tars cut at a member boundary."""

from __future__ import annotations

import io
import os
import pickle
import tarfile

import pytest
from conftest import jpeg_bytes, tar_bytes, write_shard
from s3_counting import CountingMotoServer
from salmap.pipeline.decode import DecodeSpec, decode_batch
from salmap.pipeline.shard_reader import read_shard
from salmap.pipeline.shard_stream import READ_BUFFER, _S3Body


def _rows(url, **kw):
    return [r for chunk in read_shard(str(url), **kw) for r in chunk]


@pytest.fixture
def counting_s3():
    import pyarrow.fs as pafs

    server = CountingMotoServer()
    server.start()
    host, port = server.get_host_and_port()
    pafs.S3FileSystem(endpoint_override=f"{host}:{port}", scheme="http", region="us-east-1",
                      allow_bucket_creation=True).create_dir("wds")
    yield server
    server.stop()


def _put(server, name: str, data: bytes) -> str:
    import boto3

    boto3.client("s3", endpoint_url=server.endpoint, region_name="us-east-1").put_object(
        Bucket="wds", Key=name, Body=data)
    return f"s3://wds/{name}"


@pytest.mark.parametrize("size_mb", [0.4, 20])
def test_a_shard_is_read_with_one_get_whatever_its_size(counting_s3, size_mb):
    # 0.4 MB: 40 samples of 10 KB (the tar parser asks for 10 KiB at a time: one ranged GET
    # each through pyarrow's stream); 20 MB: more than two read buffers
    per = int(size_mb * 1e6) // 40
    data = tar_bytes([(f"k{i:03d}.{s}", os.urandom(per // 2)) for i in range(40) for s in ("jpg", "cls")])
    url = _put(counting_s3, f"one-get-{size_mb}.tar", data)
    assert len(data) > READ_BUFFER * 2 or size_mb < 1
    before = len(counting_s3.requests)
    rows = _rows(url, storage={"endpoint": counting_s3.endpoint})
    assert [r["__key__"] for r in rows[:-1]] == [f"k{i:03d}" for i in range(40)]
    assert rows[-1]["shard_samples"] == 40 and not rows[-1]["__error__"]
    assert pickle.loads(rows[7]["members"])["cls"] == data[_offset(data, "k007.cls"):][:per // 2]
    path = f"/wds/one-get-{size_mb}.tar"
    assert counting_s3.gets(path) == 1, counting_s3.requests[before:]
    assert all(p == path for _, p, _ in counting_s3.requests[before:])  # no HEAD, no listing


def _offset(data: bytes, name: str) -> int:
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        return tar.getmember(name).offset_data


def test_a_body_that_breaks_is_resumed_from_where_it_stopped(counting_s3):
    from salmap.pipeline.storage import s3_client

    data = tar_bytes([(f"k{i}.bin", os.urandom(300_000)) for i in range(4)])
    url = _put(counting_s3, "resumed.tar", data)

    class Breaking:
        """A real GET's body that fails after 500 KB, as a dropped connection does."""

        def __init__(self, body):
            self.body, self.left = body, 500_000

        def read(self, n):
            if self.left <= 0:
                raise ConnectionResetError("connection reset by peer")
            chunk = self.body.read(min(n, self.left))
            self.left -= len(chunk)
            return chunk

        def close(self):
            self.body.close()

    class BreakingClient:
        def __init__(self, client):
            self.client = client

        def get_object(self, **kw):
            resp = self.client.get_object(**kw)
            return {**resp, "Body": Breaking(resp["Body"])}

    client = BreakingClient(s3_client({"endpoint": counting_s3.endpoint}))
    before = len(counting_s3.requests)
    raw = _S3Body(client, "wds", "resumed.tar", resumes=2)
    assert io.BufferedReader(raw, 64 << 10).read() == data
    assert raw.gets == 3
    assert [(m, r) for m, _, r in counting_s3.requests[before:]] == [
        ("GET", ""), ("GET", "bytes=500000-"), ("GET", "bytes=1000000-")]
    # a body that keeps breaking gives up after the resumes, as an I/O error (the unit retries)
    raw = _S3Body(client, "wds", "resumed.tar", resumes=1)
    with pytest.raises(OSError, match="broke at byte 1000000 of 1208320"):
        io.BufferedReader(raw, 64 << 10).read()
    assert url.endswith("resumed.tar")


def test_a_missing_s3_shard_is_unreadable(counting_s3):
    (end,) = _rows("s3://wds/missing.tar", storage={"endpoint": counting_s3.endpoint})
    assert end["unreadable"] and "NoSuchKey" in end["__error__"]
    (end,) = _rows("s3://no-such-bucket/x.tar", storage={"endpoint": counting_s3.endpoint})
    assert end["unreadable"] and "NoSuchBucket" in end["__error__"]


HOSTILE = [
    ("../../../../outside/x", "'..' segment"),
    ("/abs/y", "absolute path"),
    ("C:/win/z", "drive letter"),
    ("back\\slash", "backslash"),
    ("bell\x07", "control character"),
    ("a//b", "empty path segment"),
    ("x" * 600, "longer than 512 bytes"),
]


def test_hostile_member_names_are_error_rows_naming_the_member(tmp_path):
    members = [("good/a.jpg", jpeg_bytes(0, (40, 40))), ("good/a.cls", b"1")]
    for key, _ in HOSTILE:
        members += [(f"{key}.jpg", jpeg_bytes(1, (40, 40))), (f"{key}.cls", b"2")]
    members += [("z.jpg", jpeg_bytes(2, (40, 40)))]
    path = tmp_path / "hostile.tar"
    path.write_bytes(tar_bytes(members))
    rows = _rows(path)
    assert rows[0]["__key__"] == "good/a" and not rows[0]["__error__"]
    for row, (key, why) in zip(rows[1:], HOSTILE):
        assert why in row["__error__"] and "sample key refused: tar member" in row["__error__"]
        assert pickle.loads(row["members"]) == {}  # the refused sample's bytes are not kept
        assert row["__key__"] == ascii(key)[1:-1][:512] or "..." in row["__key__"]
    assert "'../../../../outside/x.jpg'" in rows[1]["__error__"]
    assert "bell\\x07" in rows[5]["__error__"]  # control characters are shown escaped
    assert rows[-2]["__key__"] == "z" and not rows[-2]["__error__"]
    assert rows[-1]["shard_samples"] == 1 + len(HOSTILE) + 1 and not rows[-1]["__error__"]
    batch = decode_batch(rows, DecodeSpec(("jpg",), "cls", "json", 32, 36, 10**8))
    assert list(batch["status"]) == ["ok"] + ["error"] * len(HOSTILE) + ["ok", "shard_end"]
    assert "'..' segment" in batch["error"][1]


def test_a_tar_cut_at_a_member_boundary_is_truncated_not_complete(tmp_path):
    path = tmp_path / "s.tar"
    write_shard(path, [{"__key__": f"c{i}", "cls": str(i).encode(), "jpg": jpeg_bytes(i)}
                       for i in range(3)])
    with tarfile.open(path) as tar:
        jpg = tar.getmember("c1.jpg")
    whole = path.read_bytes()
    for cut in (jpg.offset, jpg.offset + 100):  # before c1.jpg's header; inside it
        path.write_bytes(whole[:cut])
        rows = _rows(path)
        assert [r["__key__"] for r in rows] == ["c0", "c1", ""]
        assert not rows[0]["__error__"] and "damaged inside this sample" in rows[1]["__error__"]
        assert "end-of-archive" in rows[-1]["__error__"] and rows[-1]["shard_samples"] == 2
    path.write_bytes(whole)  # complete: no error
    assert not _rows(path)[-1]["__error__"]


def test_the_report_reads_its_photos_with_one_get_per_shard(counting_s3):
    """The gallery's photos (``report.photos.load_photos``) come through the same buffered
    stream as the run's reads: one GET of a shard for all its wanted samples, not one ranged GET
    per 10 KiB of tar as pyarrow's unbuffered stream made (32 for this 0.33 MB shard)."""
    from salmap.pipeline.report.photos import load_photos

    images = {i: jpeg_bytes(i, size=(96, 96)) for i in range(40)}  # ~8 KB of noise each
    members = [(f"k{i:03d}.{ext}", data) for i in range(40)
               for ext, data in (("jpg", images[i]), ("json", b'{"boxes": []}'))]
    url = _put(counting_s3, "photos.tar", tar_bytes(members))
    path = "/wds/photos.tar"
    before = len(counting_s3.requests)
    got = load_photos({("photos", "k002"), ("photos", "k039")}, {"shards": [url]},
                      {"endpoint": counting_s3.endpoint})
    assert not got.problems, got.problems
    assert sorted(got.images) == [("photos", "k002"), ("photos", "k039")]
    assert got.images[("photos", "k039")].size == (96, 96)
    assert got.boxes_json[("photos", "k039")] == '{"boxes": []}'
    asked = [(m, r) for m, p, r in counting_s3.requests[before:] if p == path]
    # one GET, unranged; the HEAD is expand_shards finding the named shard (not a read)
    assert sorted(asked) == [("GET", ""), ("HEAD", "")], asked
