"""bfloat16 transport (`preprocess.transport_dtype: bfloat16`): the rounding is torch's, bit for bit.

The workers round the processor's float32 pixel_values on the bits (numpy has no bfloat16); an engine
that gets float32 and casts to its bfloat16 model rounds with torch. Both must give the same bits, or
a bfloat16 request would not be the request the engine would have computed itself.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from preprocess.processors import bfloat16_bits
from sidecar.config import from_mapping


def torch_bits(values: np.ndarray) -> np.ndarray:
    return torch.from_numpy(values).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)


def test_rounding_equals_torchs_on_every_kind_of_float32() -> None:
    rng = np.random.default_rng(16)
    special = np.array(
        [
            0.0,
            -0.0,
            1.0,
            -1.0,
            np.inf,
            -np.inf,
            np.nan,
            -np.nan,
            1e-45,
            -1e-45,
            1.1754942e-38,
            3.4028235e38,
            -3.4028235e38,
        ],
        np.float32,
    )
    # Every rounding case: low halves just below, at and above the tie, with the kept bit odd and even.
    kept = rng.integers(0, 1 << 16, 4096, dtype=np.uint32) << np.uint32(16)
    lows = np.array([0, 1, 0x7FFF, 0x8000, 0x8001, 0xFFFF], np.uint32)
    ties = (kept[:, None] | lows[None, :]).reshape(-1).view(np.float32)
    normalised = rng.normal(0, 2, 100_000).astype(np.float32)  # what pixel_values look like
    random_bits = rng.integers(0, 1 << 32, 100_000, dtype=np.uint64).astype(np.uint32).view(np.float32)
    for values in (special, ties, normalised, random_bits):
        mine = bfloat16_bits(values)
        assert mine.dtype == np.uint16 and mine.shape == values.shape
        nan = np.isnan(values)
        assert np.array_equal(mine[~nan], torch_bits(values)[~nan])
        # NaN stays NaN (exponent all ones, a mantissa bit set); its bits differ between torch's own
        # scalar (0x7FC0) and vectorised (0xFFFF) casts, and pixel values are never NaN.
        assert np.all(mine[nan] == 0x7FC0) and np.all(torch_bits(values)[nan] & 0x7FC0 == 0x7FC0)


def test_it_keeps_the_shape_and_reads_any_layout() -> None:
    values = np.arange(24, dtype=np.float32).reshape(2, 3, 4) / 7
    assert np.array_equal(bfloat16_bits(values), torch_bits(values))
    strided = values[:, ::2, 1:]
    assert np.array_equal(bfloat16_bits(strided), torch_bits(np.ascontiguousarray(strided)))


def test_the_config_takes_bfloat16_for_any_processor() -> None:
    for processor in ("qwen2-vl", "llava-1.5", "siglip"):
        config = from_mapping({"preprocess": {"processor": processor, "transport_dtype": "bfloat16"}})
        assert config.preprocess.transport_dtype == "bfloat16"
    with pytest.raises(ValueError, match="transport_dtype"):
        from_mapping({"preprocess": {"transport_dtype": "float16"}})
