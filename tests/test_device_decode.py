"""resources.decode_device: the decode stage leaves plain JPEGs to the actor, which decodes,
resizes and crops them on its device; forced here on a CPU (torchvision's CPU decoder)."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from conftest import jpeg_bytes
from PIL import Image
from salmap.pipeline.decode import DecodeSpec, decode_batch
from salmap.pipeline.device_decode import defer_batch, jpeg_header
from salmap.workers.device_decode import decode_rows

SPEC = DecodeSpec(("jpg", "png"), "cls", "json", 32, 37, 10**8)


def _photo(size=(60, 45)) -> np.ndarray:
    y, x = np.mgrid[0:size[1], 0:size[0]]
    return np.stack([x * 4 % 256, y * 5 % 256, (x + y) * 2 % 256], -1).astype(np.uint8)


def _encode(arr, fmt="JPEG", **kw) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format=fmt, quality=95, **kw)
    return buf.getvalue()


def _rows() -> list[dict]:
    rotated = Image.Image.getexif(Image.new("RGB", (1, 1)))
    rotated[0x0112] = 6
    url = "/d/s-000000.tar"
    return [
        {"__key__": "jpeg", "__url__": url, "jpg": _encode(_photo()), "cls": b"3"},
        {"__key__": "png", "__url__": url, "png": _encode(_photo(), "PNG"), "cls": b"4"},
        {"__key__": "rot", "__url__": url, "jpg": _encode(_photo(), exif=rotated.tobytes())},
        {"__key__": "cut", "__url__": url, "jpg": _encode(_photo())[:-300]},
        {"__key__": "gray", "__url__": url, "jpg": jpeg_bytes(1, mode="L")},
        {"__url__": url, "shard_end": True, "shard_samples": 5},
    ]


def test_jpeg_header_takes_only_what_the_device_reproduces():
    assert jpeg_header(_encode(_photo()), 10**8) == (45, 60)
    assert jpeg_header(_encode(_photo(), "PNG"), 10**8) is None
    assert jpeg_header(_encode(_photo()), 100) is None  # above max_pixels: the CPU says why
    assert jpeg_header(b"\xff\xd8garbage", 10**8) is None


def test_deferred_rows_have_the_cpu_paths_columns_and_geometry():
    cpu, dev = decode_batch(_rows(), SPEC), defer_batch(_rows(), SPEC)
    assert list(dev["jpeg"][:1]) != [b""] and dev["jpeg"][1] == b"" and dev["jpeg"][2] == b""
    assert dev["jpeg"][4] != b"" and dev["jpeg"][5] == b""
    for col in cpu:
        if col in ("image", "status", "error"):
            continue
        rows = [0, 1, 2, 4, 5]  # the cut JPEG has its geometry only on the device path
        assert [dev[col][i] for i in rows] == [cpu[col][i] for i in rows], col
    # the PNG and the rotated JPEG were decoded on the CPU, as before
    for i in (1, 2):
        np.testing.assert_array_equal(dev["image"][i], cpu["image"][i])
    assert list(dev["status"]) == ["ok", "ok", "ok", "ok", "ok", "shard_end"]
    assert cpu["status"][3] == "error"  # the cut JPEG: the device finds out (next test)


def test_the_actor_side_decodes_like_the_cpu_and_reports_a_corrupt_jpeg():
    cpu, dev = decode_batch(_rows(), SPEC), defer_batch(_rows(), SPEC)
    images, errors = decode_rows(dev, torch.device("cpu"))
    assert set(images) == {0, 3, 4} - set(errors) and 3 in errors and "corrupt" in errors[3]
    for i in (0, 4):
        got = images[i].permute(1, 2, 0).numpy().astype(int)
        assert got.shape == (32, 32, 3)
        assert np.abs(got - cpu["image"][i].astype(int)).mean() < 3.0  # rounding, not geometry


@pytest.mark.parametrize("switch", ["cuda"])
def test_the_explainer_explains_deferred_rows(switch):
    from salmap.workers.actor import ActorSpec, Explainer

    explainer = Explainer(ActorSpec(model={"name": "r18", "source": "torchvision:resnet18",
                                           "weights": "none", "input_size": 32},
                                    method="gradcam", device="cpu"))
    out = explainer(defer_batch(_rows(), SPEC))
    by_key = dict(zip(out["key"], out["status"]))
    assert by_key == {"jpeg": "ok", "png": "ok", "rot": "ok", "cut": "error", "gray": "ok",
                      "": "shard_end"}
    cut = list(out["key"]).index("cut")
    assert "corrupt" in out["error"][cut]
