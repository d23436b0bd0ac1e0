"""A fast lossless 8-bit grayscale PNG writer for saliency maps.

Pillow's PNG encoder at its default zlib level 6 with adaptive filtering costs about 5-7 ms
for a 400x300 map on one core, the largest single cost of the post stage. Saliency maps are
smooth, so the "Up" filter (row minus the row above, one numpy subtraction for the whole
image) followed by zlib level 1 gives files of about the same size in a tenth of the time.
The pixels are the same: any PNG reader decodes exactly the uint8 image that was passed in.
"""

from __future__ import annotations

import struct
import zlib

import numpy as np

_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_IEND = struct.pack(">I", 0) + b"IEND" + struct.pack(">I", zlib.crc32(b"IEND") & 0xFFFFFFFF)
ZLIB_LEVEL = 1


def _chunk(tag: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + tag + body + struct.pack(
        ">I", zlib.crc32(body, zlib.crc32(tag)) & 0xFFFFFFFF)


def gray_png(image: np.ndarray, level: int = ZLIB_LEVEL) -> bytes:
    """``uint8 [H, W]`` -> PNG bytes (8-bit grayscale, every row "Up"-filtered)."""
    if image.dtype != np.uint8 or image.ndim != 2 or 0 in image.shape:
        raise ValueError(f"gray_png needs a non-empty uint8 [H, W] image, got {image.dtype} "
                         f"{image.shape}")
    h, w = image.shape
    rows = np.empty((h, w + 1), np.uint8)
    rows[:, 0] = 2  # filter type Up
    rows[0, 1:] = image[0]
    np.subtract(image[1:], image[:-1], out=rows[1:, 1:])  # modulo 256, as PNG specifies
    header = struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0)
    return b"".join((_SIGNATURE, _chunk(b"IHDR", header),
                     _chunk(b"IDAT", zlib.compress(rows.tobytes(), level)), _IEND))
