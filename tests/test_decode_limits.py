"""input.max_pixels is Pillow's limit for the call, raised and lowered, and never leaks."""

from __future__ import annotations

import io
import threading
import time

import pytest
from PIL import Image
from salmap.pipeline.decode import DecodeError, DecodeSpec, decode_row, open_image


def _png(size: tuple[int, int], mode: str = "L") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, 1).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def large_png() -> bytes:
    """A genuine 12000 x 9000 photo-sized scan (108 M pixels, above Pillow's default 89 M);
    one bit per pixel keeps it a 31 kB file that encodes in half a second."""
    return _png((12000, 9000), mode="1")


def test_a_large_genuine_png_follows_max_pixels_both_ways(large_png):
    before = Image.MAX_IMAGE_PIXELS
    spec = DecodeSpec(("png",), "cls", "json", crop=32, resize=36, max_pixels=120_000_000)
    row = decode_row({"__key__": "scan", "__url__": "s.tar", "png": large_png}, spec)
    assert row["status"] == "ok", row["error"]
    assert (row["orig_width"], row["orig_height"]) == (12000, 9000)
    assert Image.MAX_IMAGE_PIXELS == before
    with pytest.raises(DecodeError, match=r"108000000 pixels, above input\.max_pixels=100000000"):
        open_image(large_png, max_pixels=100_000_000)
    # the default is Pillow's own limit: refused there too, with the key to raise
    with pytest.raises(DecodeError, match=r"above input\.max_pixels=89478485"):
        open_image(large_png, max_pixels=89_478_485)
    assert Image.MAX_IMAGE_PIXELS == before


def test_pillow_checks_each_call_against_its_own_limit(monkeypatch):
    """Threads decoding with different limits at once: Pillow's check always sees the limit of
    the call it runs for, and the global is restored when they are done."""
    seen: list[tuple[int | None, int]] = []  # (Pillow's limit at its check, the call's limit)
    check = Image._decompression_bomb_check
    local = threading.local()

    def spy(size):
        time.sleep(0.001)  # let the other threads run in the middle of a decode
        seen.append((Image.MAX_IMAGE_PIXELS, local.limit))
        return check(size)

    monkeypatch.setattr(Image, "_decompression_bomb_check", spy)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # a process-wide setting to keep
    image = _png((200, 100))  # 20000 pixels
    outcomes: list[tuple[int, bool]] = []

    def work(limit: int) -> None:
        local.limit = limit
        for _ in range(30):
            try:
                open_image(image, max_pixels=limit)
                outcomes.append((limit, True))
            except DecodeError as err:
                assert "input.max_pixels" in str(err)
                outcomes.append((limit, False))

    threads = [threading.Thread(target=work, args=(lim,)) for lim in (5_000, 50_000) * 2]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(seen) >= 120 and all(pillow == limit for pillow, limit in seen)
    assert {(lim, ok) for lim, ok in outcomes} == {(5_000, False), (50_000, True)}
    assert len(outcomes) == 120
    assert Image.MAX_IMAGE_PIXELS == 1000
