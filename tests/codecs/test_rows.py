"""Outlier token rows (``+rows:k<K>``): spec, selection, the one-in-64 cap, wire layout, BF16 fidelity, errors.

The contract suite (``test_all_codecs.py``) runs the registered ``+rows`` examples through the generic checks
(round trip, sizes, decode_sum order, non-finite input, dtypes); this file tests what is specific to rows.
"""

from __future__ import annotations

import pytest
import torch

from megatron_tpcomp.codecs import CodecError, make_codec
from megatron_tpcomp.codecs.rows import ROWS_PER_OUTLIER, RowOutlierCodec
from megatron_tpcomp.spec import parse_spec


def spiky(rows: int = 512, h: int = 576, seed: int = 0) -> torch.Tensor:
    """N(0,1) rows with two massive rows (0 and 100, as the first token and a delimiter) and one spike."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, h, generator=g)
    x[0] *= 300.0
    x[100, 7] = 5000.0
    return x


def test_spec_round_trip_and_canonical_form() -> None:
    codec = make_codec("int4:g32+had+rows:k4")
    assert isinstance(codec, RowOutlierCodec) and codec.row_structured and codec.k == 4
    assert codec.spec == "int4:g32:sfp16+had:b32+rows:k4"
    assert parse_spec(codec.spec).rows_k == 4 and parse_spec(codec.spec).base == parse_spec("int4:g32")
    assert make_codec(codec.spec) == codec


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("int4+rows", "'rows' needs the number of rows"),
        ("int4+rows:k0", "unknown rows option 'k0'"),
        ("int4+rows:b4", "unknown rows option 'b4'"),
        ("int4+rows:k2+rows:k3", "modifier 'rows' given twice"),
    ],
)
def test_bad_specs_name_the_problem(spec: str, message: str) -> None:
    with pytest.raises(CodecError, match=message):
        parse_spec(spec)


def test_rows_sent_is_capped_at_one_in_64() -> None:
    codec = make_codec("int4:g32+rows:k4")
    assert [codec.rows_sent(r) for r in (1, 63, 64, 128, 255, 256, 4096)] == [0, 0, 1, 2, 3, 4, 4]
    # A decode-step message (one token) is the inner codec's payload alone.
    inner = make_codec("int4:g32")
    assert codec.payload_nbytes((1, 576)) == inner.payload_nbytes((1, 576))
    assert ROWS_PER_OUTLIER == 64


def test_wire_layout_and_exact_bits() -> None:
    codec = make_codec("int4:g32+had+rows:k4")
    inner = make_codec("int4:g32+had")
    layout = codec.layout((512, 576))
    assert [(s.name, s.count) for s in layout.sections.values()] == [
        ("indices", 4),
        ("outliers", 4 * 576),
        ("inner", inner.payload_nbytes((512, 576))),
    ]
    # 32 bytes of int64 indices, 4 bf16 rows (a multiple of 16 bytes), then the inner payload.
    assert codec.payload_nbytes((512, 576)) == 32 + 4 * 576 * 2 + inner.payload_nbytes((512, 576))


def test_selection_finds_the_massive_rows_and_sends_them_in_bf16() -> None:
    x = spiky()
    codec = make_codec("int4:g32+had+rows:k2")
    payload = codec.encode(x)
    layout = codec.layout(x.shape)
    assert layout.view(payload, "indices").tolist() == [0, 100]
    y = codec.decode(payload, x.shape, torch.float32)
    # The two rows are bf16 roundings of the input: relative error at most 2^-8 per value.
    for r in (0, 100):
        assert torch.equal(y[r], x[r].to(torch.bfloat16).float())
    # The other rows: int4's ordinary error, and no worse than without the modifier (with fp16 group scales the
    # spikes' super-blocks do not hurt the other rows; the E4M3 test below shows where they do).
    plain = make_codec("int4:g32+had")
    y0 = plain.decode(plain.encode(x), x.shape, torch.float32)
    rest = torch.ones(512, dtype=torch.bool)
    rest[[0, 100]] = False
    err = float((y - x)[rest].norm() / x[rest].norm())
    err0 = float((y0 - x)[rest].norm() / x[rest].norm())
    assert err < 0.12 and err <= err0  # int4:g32+had on N(0,1): ~0.09 (the contract suite's bound is 0.12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_ties_go_to_the_lower_row_and_nan_counts_as_largest(dtype: torch.dtype) -> None:
    x = torch.zeros(128, 64)
    x[5, 0] = x[9, 0] = x[70, 3] = 2.0  # three rows tie; two are sent
    codec = make_codec("int8:g32+rows:k2")
    assert codec.layout(x.shape).view(codec.encode(x.to(dtype)), "indices").tolist() == [5, 9]
    x[90, 1] = float("nan")
    payload = codec.encode(x.to(dtype))
    assert codec.layout(x.shape).view(payload, "indices").tolist() == [5, 90]
    y = codec.decode(payload, x.shape, torch.float32)
    assert torch.isnan(y[90, 1]) and torch.isfinite(y[torch.arange(128) != 90]).all()


def test_fp32_rows_beyond_bf16_stay_finite_and_inf_stays_inf() -> None:
    x = torch.zeros(64, 32)
    x[3, 0] = 3.4e38  # fp32, above bf16's largest finite value (3.3895e38): would round to Inf
    x[3, 1] = float("-inf")
    y = make_codec("int8:g32+rows:k1").decode(make_codec("int8:g32+rows:k1").encode(x), x.shape, torch.float32)
    assert y[3, 0] == torch.finfo(torch.bfloat16).max and y[3, 1] == float("-inf")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_decode_sum_is_the_inner_sum_then_the_rows_in_payload_order(dtype: torch.dtype) -> None:
    # The definition (module docstring), computed here from the payloads' sections with plain torch.
    codec = make_codec("int5:g64:se4m3+had+rows:k4")
    xs = [spiky(seed=s) for s in range(3)]
    for s, x in enumerate(xs):
        x[200 + s] *= 500.0  # each rank also has a massive row of its own
    payloads = [codec.encode(x.to(torch.bfloat16)) for x in xs]
    layout = codec.layout((512, 576))
    want = codec.inner.decode_sum(
        torch.cat([layout.view(p, "inner") for p in payloads]), 3, (512, 576), torch.float32
    ).clone()
    for p in payloads:
        rows = layout.view(p, "indices")
        assert rows.tolist() == sorted(rows.tolist()) and 0 in rows.tolist()
        want[rows] += layout.view(p, "outliers").view(4, 576).float()
    top = torch.finfo(dtype).max
    got = codec.decode_sum(torch.cat(payloads), 3, (512, 576), dtype)
    assert torch.equal(got, want.clamp(-top, top).to(dtype))
    # One payload: decode is the sum of one.
    assert torch.equal(
        codec.decode(payloads[0], (512, 576), dtype), codec.decode_sum(payloads[0], 1, (512, 576), dtype)
    )


def test_corrupt_indices_decode_to_nan_or_raise_when_checked(monkeypatch: pytest.MonkeyPatch) -> None:
    codec = make_codec("int4:g32+rows:k2")
    x = spiky(rows=128, h=64)
    payload = codec.encode(x)
    codec.layout(x.shape).view(payload, "indices").copy_(torch.tensor([3, 3], dtype=torch.int32))
    assert torch.isnan(codec.decode(payload, x.shape, torch.float32)).all()
    monkeypatch.setenv("TPCOMP_CHECK_PAYLOADS", "1")
    with pytest.raises(CodecError, match=r"invalid row indices \[\[3, 3\]\]"):
        codec.decode(payload, x.shape, torch.float32)


def test_se4m3_scales_lose_less_with_the_massive_rows_out() -> None:
    # Why the modifier exists: a massive row sets its super-block's exponent, and the E4M3 group scales of the
    # ordinary rows sharing that super-block lose precision. Taking the massive rows out restores it.
    x = spiky()
    x[1:] *= 1e-3  # ordinary rows 2^18 below the massive one: beyond the window of E4M3 scales
    plain = make_codec("int4:g64:se4m3+had")
    rows = make_codec("int4:g64:se4m3+had+rows:k2")
    near = slice(1, 4096 // 576)  # rows 1..6: the rest of the first 4096-value super-block

    def err(codec: RowOutlierCodec) -> float:
        y = codec.decode(codec.encode(x), x.shape, torch.float32)
        return float((y - x)[near].norm() / x[near].norm())

    assert err(plain) > 0.5  # flushed: most of these rows' groups decode to zero
    assert err(rows) < 0.12  # int4's ordinary error


def test_no_sync_encode_and_decode_with_rows_sent() -> None:
    # The collectives' no-sync suite runs +rows on messages under 64 rows (no row sent); here the selection,
    # the gathers and the scatter of k = 2 rows run under the same guard after a warm-up call.
    from tests.collectives.test_no_sync import no_sync

    codec = make_codec("int5:g64:se4m3+had+rows:k2")
    x = spiky(rows=128, h=576).to(torch.bfloat16)
    warm = codec.decode_sum(torch.cat([codec.encode(x)] * 2), 2, x.shape, torch.bfloat16)
    with no_sync():
        payload = codec.encode(x)
        again = codec.decode_sum(torch.cat([payload] * 2), 2, x.shape, torch.bfloat16)
    assert torch.equal(again, warm)
