"""The shard reader: WebDataset grouping, salvage of truncated tars, unreadable shards, S3."""

from __future__ import annotations

import io
import os
import pickle
import tarfile

import pytest
from conftest import jpeg_bytes, tar_bytes, write_shard
from salmap.pipeline.decode import DecodeSpec, decode_batch
from salmap.pipeline.shard_reader import describe, read_shard, split_member


def _rows(url, **kw):
    return [r for chunk in read_shard(str(url), **kw) for r in chunk]


def _members(row):
    return pickle.loads(row["members"])


def _three(tmp_path):
    path = tmp_path / "s-000000.tar"
    write_shard(path, [{"__key__": f"c{i}", "jpg": jpeg_bytes(i, (64, 64)), "cls": str(i).encode()}
                       for i in range(3)])
    return path


def test_members_group_into_samples_by_the_webdataset_rule(tmp_path):
    assert split_member("dir/a.b.jpg") == ("dir/a", "b.jpg")
    assert split_member("a.JPG") == ("a", "JPG")
    assert split_member("README") is None
    path = tmp_path / "x.tar"
    with tarfile.open(path, "w") as tar:
        for name, data in [("sub/k1.jpg", b"1"), ("sub/k1.seg.png", b"2"), ("k2.cls", b"3"),
                           ("README", b"no suffix: skipped")]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    rows = _rows(path)
    assert [r["__key__"] for r in rows] == ["sub/k1", "k2", ""]
    assert _members(rows[0]) == {"jpg": b"1", "seg.png": b"2"}
    assert rows[-1]["shard_end"] and rows[-1]["shard_samples"] == 2 and not rows[-1]["__error__"]


def test_a_truncated_tar_keeps_every_sample_before_the_cut(tmp_path):
    path = _three(tmp_path)
    with tarfile.open(path) as tar:
        second = tar.getmember("c1.jpg")
    data = path.read_bytes()
    path.write_bytes(data[: second.offset_data + 100])  # cut inside sample c1's image
    rows = _rows(path)
    assert [r["__key__"] for r in rows] == ["c0", "c1", ""]
    assert _members(rows[0]) == {"jpg": jpeg_bytes(0, (64, 64)), "cls": b"0"}
    assert "damaged inside this sample" in rows[1]["__error__"]
    end = rows[-1]
    assert end["shard_samples"] == 2 and not end["unreadable"]
    assert "tarfile.ReadError: unexpected end of data" in end["__error__"]
    # decoded: c0 ok, c1 an error row naming the damage, then the marker
    batch = decode_batch(rows, DecodeSpec(("jpg",), "cls", "json", 32, 36, 10**8))
    assert list(batch["status"]) == ["ok", "error", "shard_end"]
    assert batch["shard_samples"][2] == 2 and "unexpected end of data" in batch["shard_error"][2]
    assert list(batch["image_file"][:1]) == ["c0.jpg"]


@pytest.mark.parametrize("content, phrase", [
    (b"", "empty (0 bytes)"),
    (os.urandom(3000), "tarfile.ReadError"),
])
def test_empty_and_garbage_shards_say_why(tmp_path, content, phrase):
    path = tmp_path / "bad.tar"
    path.write_bytes(content)
    (end,) = _rows(path)
    assert end["shard_end"] and end["shard_samples"] == 0 and phrase in end["__error__"]


def test_a_shard_that_cannot_be_opened_is_unreadable_not_empty(tmp_path):
    (end,) = _rows(tmp_path / "gone.tar")
    assert end["unreadable"] and "FileNotFoundError" in end["__error__"]


def test_samples_split_across_the_tar_are_refused(tmp_path):
    path = tmp_path / "mixed.tar"
    with tarfile.open(path, "w") as tar:
        for name in ("a.jpg", "b.jpg", "a.cls"):
            info = tarfile.TarInfo(name)
            info.size = 1
            tar.addfile(info, io.BytesIO(b"x"))
    rows = _rows(path)
    assert [r["__key__"] for r in rows[:-1]] == ["a", "b"]  # what came before is kept
    assert "not contiguous" in rows[-1]["__error__"] and "a" in rows[-1]["__error__"]


def test_chunks_are_bounded(tmp_path):
    path = tmp_path / "many.tar"
    write_shard(path, [{"__key__": f"k{i:03d}", "cls": b"1"} for i in range(10)])
    chunks = list(read_shard(str(path), chunk=4))
    assert [len(c) for c in chunks] == [4, 4, 3]  # the last holds 2 samples and the marker


def test_describe_names_the_module_of_the_error():
    assert describe(tarfile.ReadError("unexpected end of data")) == \
        "tarfile.ReadError: unexpected end of data"
    assert describe(ValueError("x\ny")) == "ValueError: x"


def test_reads_from_s3(tmp_path):
    from moto.server import ThreadedMotoServer
    from test_pipeline_e2e import upload

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    try:
        host, port = server.get_host_and_port()
        endpoint = f"http://{host}:{port}"
        (url,) = upload(endpoint, "wds", [str(_three(tmp_path))], "p")
        rows = _rows(url, storage={"endpoint": endpoint})
        assert [r["__key__"] for r in rows] == ["c0", "c1", "c2", ""]
        (end,) = _rows("s3://wds/p/missing.tar", storage={"endpoint": endpoint})
        assert end["unreadable"]
    finally:
        server.stop()


def test_a_member_over_the_limit_is_its_samples_error_and_the_rest_is_read(tmp_path):
    path = tmp_path / "s-000000.tar"
    path.write_bytes(tar_bytes([("a.jpg", b"1" * 100), ("a.cls", b"0"),
                                 ("big.jpg", b"x" * 4096), ("big.cls", b"1"),
                                 ("c.jpg", b"3" * 100), ("c.cls", b"2")]))
    rows = _rows(path, max_member_bytes=1024)
    assert [r["__key__"] for r in rows] == ["a", "big", "c", ""]
    assert _members(rows[0]) == {"jpg": b"1" * 100, "cls": b"0"}
    error = rows[1]["__error__"]
    assert "big.jpg" in error and "4096 bytes" in error and "1024" in error
    assert "input.max_member_bytes" in error and _members(rows[1]) == {}
    assert _members(rows[2]) == {"jpg": b"3" * 100, "cls": b"2"} and not rows[2]["__error__"]
    assert rows[-1]["shard_samples"] == 3 and not rows[-1]["__error__"]
    assert not any(r["__error__"] for r in _rows(path))  # the default limit is 256 MiB


class _HugeMemberTar(io.RawIOBase):
    """A tar whose first member claims ``size`` bytes (zeros made up as they are read, never
    held), then a small sample: a crafted shard, gigabytes without writing them."""

    def __init__(self, size: int) -> None:
        info = tarfile.TarInfo("huge.jpg")
        info.size = size
        self.parts = [(info.tobuf(format=tarfile.PAX_FORMAT), 0),
                      (b"", size + (-size % tarfile.BLOCKSIZE)),
                      (tar_bytes([("next.jpg", b"ok"), ("next.cls", b"1")]), 0)]
        self.total = sum(len(d) + n for d, n in self.parts)
        self.pos = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buf) -> int:
        start = 0
        for data, zeros in self.parts:
            length = len(data) + zeros
            if self.pos < start + length:
                at = self.pos - start
                n = min(len(buf), length - at)
                if at < len(data):
                    n = min(n, len(data) - at)
                    buf[:n] = data[at:at + n]
                else:
                    buf[:n] = bytes(n)
                self.pos += n
                return n
            start += length
        return 0


def test_a_huge_member_is_skipped_unread(tmp_path):
    """A header claiming 64 MiB with a 1 MiB limit: the sample is an error row, the next one
    is read, and the reader never holds the member (peak memory far below its size)."""
    import tracemalloc

    from salmap.pipeline.shard_reader import iter_samples

    stream = _HugeMemberTar(64 * 2**20)
    tracemalloc.start()
    try:
        samples = list(iter_samples(io.BufferedReader(stream), stream.total, 2**20))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert [s["__key__"] for s in samples] == ["huge", "next"]
    assert "huge.jpg" in samples[0]["__error__"] and str(64 * 2**20) in samples[0]["__error__"]
    assert samples[1]["members"] == {"jpg": b"ok", "cls": b"1"}
    assert peak < 8 * 2**20, peak
