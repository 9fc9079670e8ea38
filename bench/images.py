"""Test images: deterministic photo-like JPEGs, and the data URLs that carry them inline."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image


def photo_jpeg(width: int, height: int, seed: int = 0, quality: int = 90) -> bytes:
    """A deterministic photo-like JPEG (smooth colour fields plus grain), sized like a real photo's file."""
    rng = np.random.default_rng(seed)
    x = np.arange(width, dtype=np.float32)[None, :]
    y = np.arange(height, dtype=np.float32)[:, None]
    phase = float(seed)
    r = 128 + 90 * np.sin(x / 97 + phase) + 25 * np.cos(y / 61)
    g = 128 + 80 * np.cos(y / 53 + phase) + 30 * np.sin(x / 141)
    b = 128 + 60 * np.sin((x + y) / 150 + phase)
    base = np.stack(np.broadcast_arrays(r, g, b), axis=-1)
    tile = rng.normal(0, 12, (256, 256, 3)).astype(np.float32)
    grain = np.tile(tile, (-(-height // 256), -(-width // 256), 1))[:height, :width]
    pixels = np.clip(base + grain, 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def data_url(jpeg: bytes) -> str:
    import base64  # noqa: PLC0415

    return "data:image/jpeg;base64," + base64.b64encode(jpeg).decode("ascii")
