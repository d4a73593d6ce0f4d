"""Storage precisions: int8 and NF4 codes with per-block scales, against a float64 reference written
element by element from the definitions in share_convert/math/quantize.py."""

from __future__ import annotations

import math

import pytest
import torch

from share_convert.math.quantize import (
    BLOCK,
    NF4_VALUES,
    Quantized,
    bits_per_number,
    dequantize,
    quantize,
    relative_rms_error,
    round_trip,
    store,
    stored_bytes,
    values,
)


def reference(x: torch.Tensor, precision: str, block: int = BLOCK) -> torch.Tensor:
    """The definition, one block and one number at a time, in float64."""
    out = torch.zeros(x.shape, dtype=torch.float64)
    for i in range(x.shape[0]):
        for start in range(0, x.shape[1], block):
            part = [float(v) for v in x[i, start : start + block]]
            absmax = max(abs(v) for v in part)
            if precision == "int8":
                scale = float(torch.tensor(absmax / 127, dtype=torch.float32))
                for j, v in enumerate(part):
                    code = 0 if scale == 0 else max(-127, min(127, round(v / scale)))
                    out[i, start + j] = float(torch.tensor(code * scale, dtype=torch.float32))
            else:
                scale = float(torch.tensor(absmax, dtype=torch.float32))
                for j, v in enumerate(part):
                    u = 0.0 if scale == 0 else v / scale
                    level = min(NF4_VALUES, key=lambda lv: (abs(lv - u), lv))
                    out[i, start + j] = float(torch.tensor(level, dtype=torch.float32) * torch.tensor(scale))
    return out


@pytest.fixture(scope="module")
def gaussian() -> torch.Tensor:
    return torch.randn(6, 150, generator=torch.Generator().manual_seed(3), dtype=torch.float64)


@pytest.mark.parametrize("precision", ["int8", "nf4"])
def test_dequantized_values_equal_the_definition(gaussian, precision):
    got = dequantize(quantize(gaussian, precision)).double()
    assert torch.equal(got, reference(gaussian, precision))


@pytest.mark.parametrize("precision", ["int8", "nf4"])
def test_blocks_run_along_rows_so_a_row_quantizes_alone(gaussian, precision):
    whole = quantize(gaussian, precision)
    row = quantize(gaussian[2:3], precision)
    assert torch.equal(whole.codes[2:3], row.codes) and torch.equal(whole.scales[2:3], row.scales)


def test_nf4_packs_two_codes_per_byte_low_nibble_first():
    x = torch.tensor([[-1.0, 1.0, 0.0]])
    q = quantize(x, "nf4")
    assert q.codes.tolist() == [[0 | (15 << 4), 7]]
    assert dequantize(q).tolist() == [[-1.0, 1.0, 0.0]]


@pytest.mark.parametrize("precision", ["int8", "nf4"])
def test_a_zero_block_stays_zero(precision):
    x = torch.zeros(2, 70)
    x[1, 65] = 3.0
    got = dequantize(quantize(x, precision))
    assert got[0].abs().max() == 0 and got[1, :64].abs().max() == 0 and got[1, 65] == 3.0


@pytest.mark.parametrize("precision", ["int8", "nf4"])
def test_relative_error_estimate_matches_gaussian_data(precision):
    x = torch.randn(256, 768, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    measured = float((dequantize(quantize(x, precision)).double() - x).norm() / x.norm())
    assert measured == pytest.approx(relative_rms_error(precision), rel=0.1)


def test_nf4_beats_int4_absmax_on_gaussian_data():
    x = torch.randn(128, 512, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    blocks = x.view(128, -1, BLOCK)
    scale = blocks.abs().amax(-1, keepdim=True) / 7
    int4 = (torch.round(blocks / scale).clamp(-7, 7) * scale).view_as(x)
    nf4 = dequantize(quantize(x, "nf4")).double()
    assert (nf4 - x).norm() < 0.9 * (int4 - x).norm()


@pytest.mark.parametrize(("precision", "rows", "cols"), [("int8", 3, 100), ("nf4", 3, 101), ("float16", 3, 7)])
def test_stored_bytes_count_codes_and_scales(precision, rows, cols):
    kept = store(torch.randn(rows, cols), precision)
    nbytes = kept.nbytes if hasattr(kept, "codes") else kept.numel() * kept.element_size()
    assert stored_bytes(rows, cols, precision) == nbytes


def test_bits_per_number_include_the_scales():
    assert bits_per_number(4, 64 * 10, "int8") == 8 + 32 / 64
    assert bits_per_number(4, 64 * 10, "nf4") == 4 + 32 / 64
    assert bits_per_number(4, 10, "bfloat16") == 16


def test_quantizing_is_deterministic(gaussian):
    a, b = quantize(gaussian, "nf4"), quantize(gaussian.clone(), "nf4")
    assert torch.equal(a.codes, b.codes) and torch.equal(a.scales, b.scales)


def test_values_of_a_float_precision_are_the_cast_tensor(gaussian):
    assert values(store(gaussian, "bfloat16")).dtype == torch.bfloat16
    assert math.isclose(float(values(store(gaussian, "float32"))[0, 0]), float(gaussian[0, 0]), rel_tol=1e-6)


def test_quantize_refuses_what_it_cannot_code():
    with pytest.raises(ValueError):
        quantize(torch.zeros(2, 2), "float16")
    with pytest.raises(ValueError):
        quantize(torch.zeros(2), "int8")


@pytest.mark.parametrize("precision", ["int8", "nf4"])
@pytest.mark.parametrize(
    "shape, dtype, transposed",
    [((5, 128), torch.float32, False), ((4, 150), torch.float32, False), ((3, 77), torch.bfloat16, False),
     ((96, 40), torch.float32, True)],
)  # fmt: skip
def test_round_trip_gives_exactly_the_values_the_codes_give_back(precision, shape, dtype, transposed):
    """The engine measures errors on round_trip(x) without packing codes: it must be what a reader of
    the codes gets, number for number (whole and partial blocks, odd rows, bfloat16, strided input)."""
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(5)).to(dtype)
    x = x.T if transposed else x
    assert torch.equal(round_trip(x, precision), dequantize(quantize(x, precision)))
    assert torch.equal(dequantize(quantize(x, precision)).double(), reference(x.double(), precision))


@pytest.mark.parametrize("precision", ["int8", "nf4"])
def test_rows_of_codes_and_stacked_codes_are_the_codes_of_those_rows(gaussian, precision):
    """The writer stacks the codes the encoder made of each task's rows instead of quantizing the
    stacked rows again: both must give the same bytes."""
    whole = quantize(gaussian, precision)
    part = whole.rows(1, 4)
    alone = quantize(gaussian[1:4], precision)
    assert torch.equal(part.codes, alone.codes) and torch.equal(part.scales, alone.scales)
    assert part.shape == alone.shape
    stacked = Quantized.stack([whole.rows(0, 2), whole.rows(2, 6)])
    assert torch.equal(stacked.codes, whole.codes) and torch.equal(stacked.scales, whole.scales)
