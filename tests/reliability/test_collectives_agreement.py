"""Reliability: ranks that disagree on anything that changes the bits of a compressed collective fail together,
fast and by default, instead of silently diverging or hanging (issue 14, collectives findings).

Real gloo process groups of 2 and 3 processes. Each scenario is a hostile setup a user of the direct API can
make: codecs of equal payload size, a Hadamard seed or a calibrated table that differs on one rank, a codec
parameter kind that no shipped codec has, and an algorithm / min_bytes / chunking mismatch that used to hang until
the process-group timeout. Every rank must raise CollectiveError, name each rank's setup, and the group must keep
working afterwards.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import pytest
import torch
import torch.distributed as dist

from megatron_tpcomp import collectives
from megatron_tpcomp.codecs import Codec, make_codec
from megatron_tpcomp.codecs.base import _into
from megatron_tpcomp.collectives import CollectiveError, chunking
from megatron_tpcomp.launch import DistributedRunError, run_distributed

#: Process-group timeout of the hang scenarios: short, so that code without the agreement check fails within
#: seconds (a gloo timeout) instead of hanging; long enough that the check itself never meets it.
HANG_PG_TIMEOUT_S = 5.0


class GainCodec(Codec):
    """``int4:g32`` of ``x * gain * channel_gains``: a codec with parameter kinds that no shipped codec has (a
    float and a float table, neither in its spec string). Stands in for a codec written after the agreement
    check: the check must cover it without being told about it.

    Args:
        gain: scalar multiplier (fp32 semantics) applied before encoding and divided out after decoding.
        channel_gains: fp32 ``[h]``, per-channel multipliers of the last dimension (``h`` = last dim).
    """

    block_local = False  # per-channel state: never cut a message (keeps the pipelined path out of the way)

    def __init__(self, gain: float, channel_gains: torch.Tensor):
        self.inner = make_codec("int4:g32")
        self.gain = float(gain)
        self.channel_gains = channel_gains.to(torch.float32).contiguous()
        self.spec = self.inner.spec  # the same spec string as plain int4:g32: only the parameters differ

    def payload_nbytes(self, shape: Sequence[int]) -> int:
        return self.inner.payload_nbytes(shape)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner.encode(x.float() * self.channel_gains * self.gain)

    def decode(self, payload: torch.Tensor, shape: Sequence[int], dtype: torch.dtype) -> torch.Tensor:
        return self.decode_sum(payload, 1, shape, dtype)

    def decode_sum(
        self,
        payloads: torch.Tensor,
        count: int,
        shape: Sequence[int],
        dtype: torch.dtype,
        out: torch.Tensor | None = None,
    ) -> torch.Tensor:
        acc = self.inner.decode_sum(payloads, count, shape, torch.float32)
        return _into((acc / self.gain / self.channel_gains).to(dtype), out, shape)


def _outcome(fn, *args, **kwargs) -> str:
    """The CollectiveError message of ``fn(*args, **kwargs)``, or ``"<no error>"``."""
    try:
        fn(*args, **kwargs)
    except CollectiveError as exc:
        return str(exc)
    return "<no error>"


def _input(rank: int, shape: tuple[int, ...] = (8, 64)) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(100 + rank))


# ------------------------------------------------------------------------------- equal-size codec mismatch


def _equal_size_codecs(rank: int, world_size: int) -> dict:
    # Same payload size for a multiple of 32 values: nothing on the wire tells the payloads apart.
    spec = "int4:g32" if rank == 0 else "int4:g32+had"
    x = _input(rank)
    out = {
        "all_reduce": _outcome(collectives.all_reduce, x, spec),
        "all_reduce_two_shot": _outcome(collectives.all_reduce, x, spec, algo="two-shot"),
        "all_gather": _outcome(collectives.all_gather, x, spec, dim=-1),
        "reduce_scatter": _outcome(collectives.reduce_scatter, x, spec),
    }
    out["after"] = collectives.all_reduce(torch.ones(4), "none")  # the group still works
    return out


def test_equal_size_codec_mismatch_fails_on_every_rank_by_default() -> None:
    assert make_codec("int4:g32").payload_nbytes((8, 64)) == make_codec("int4:g32+had").payload_nbytes((8, 64))
    results = run_distributed(_equal_size_codecs, 2, timeout_s=90, pg_timeout_s=20)
    for rank, res in enumerate(results):
        for op in ("all_reduce", "all_reduce_two_shot", "all_gather", "reduce_scatter"):
            msg = res[op]
            assert "ranks disagree on the message" in msg, (rank, op, msg)
            assert "the codec spec" in msg, msg
            assert "rank 0: " in msg and "'int4:g32:sfp16'" in msg, msg
            assert "rank 1: " in msg and "'int4:g32:sfp16+had:b32'" in msg, msg
            assert f"raised on rank {rank}" in msg, msg
        assert torch.equal(res["after"], torch.full((4,), 2.0))


# ------------------------------------------------------------------- parameters outside the spec string


def _hidden_parameter_codecs(rank: int, world_size: int) -> dict:
    odd = rank == world_size - 1  # only the last rank differs
    h = 64
    exps = [0] * h
    if odd:
        exps[5] = 1
    gains = torch.ones(h)
    if odd:
        gains[7] = 1.5
    codecs = {
        "hadamard_seed": make_codec("int4:g32+had", hadamard_seed=1 if odd else 0),
        "outlier_table": make_codec("int4:g32+outliers", outlier_channels=[3, 9 if odd else 8]),
        "chscale_table": make_codec("int4:g32+chscale", channel_scale_exponents=exps),
        "new_kind_scalar": GainCodec(2.0 if odd else 1.0, torch.ones(h)),
        "new_kind_table": GainCodec(1.0, gains),
    }
    x = _input(rank, (6 * world_size, h))
    out: dict = {}
    for name, codec in codecs.items():
        out[name, "check_ranks=True"] = _outcome(collectives.all_reduce, x, codec, check_ranks=True)
        out[name, "default"] = _outcome(collectives.all_gather, x, codec)
        out[name, "reduce_scatter"] = _outcome(collectives.reduce_scatter, x, codec)
    out["after"] = collectives.all_reduce(torch.ones(4), "none")
    return out


@pytest.mark.timeout(120)
def test_parameters_outside_the_spec_string_are_compared() -> None:
    n = 3
    results = run_distributed(_hidden_parameter_codecs, n, timeout_s=100, pg_timeout_s=20)
    names = {k[0] for k in results[0] if isinstance(k, tuple)}
    assert names == {"hadamard_seed", "outlier_table", "chscale_table", "new_kind_scalar", "new_kind_table"}
    for rank, res in enumerate(results):
        for key, msg in res.items():
            if key == "after":
                continue
            assert "ranks disagree on the message" in msg, (rank, key, msg)
            # The spec strings are equal: the message must point at the parameters, not the spec.
            assert "codec parameters outside the spec string" in msg and "the codec spec" not in msg, msg
            assert f"raised on rank {rank}" in msg and f"rank {n - 1}: " in msg, msg
        assert torch.equal(res["after"], torch.full((4,), float(n)))


def test_the_codec_fingerprint_covers_new_parameter_kinds_and_ignores_caches() -> None:
    from megatron_tpcomp import agreement

    ones = torch.ones(64)
    base = agreement.codec_fingerprint(GainCodec(1.0, ones))
    assert agreement.codec_fingerprint(GainCodec(1.0, ones.clone())) == base  # equal parameters, new objects
    assert agreement.codec_fingerprint(GainCodec(1.0 + 2**-20, ones)) != base  # a float outside the spec
    table = ones.clone()
    table[63] = 1.0 + 2**-23  # one ulp in the last element of a table
    assert agreement.codec_fingerprint(GainCodec(1.0, table)) != base
    assert agreement.codec_fingerprint(make_codec("int4:g32")) != base  # same spec string, another class

    # Shipped codecs: seeds and calibrated tables; derived per-device caches filled by use change nothing.
    had = make_codec("int4:g32+had")
    assert agreement.codec_fingerprint(make_codec("int4:g32+had", hadamard_seed=7)) != agreement.codec_fingerprint(had)
    out = make_codec("int4:g32+outliers", outlier_channels=[1, 2])
    before = agreement.codec_fingerprint(out)
    out.encode(torch.randn(4, 16))  # fills the codec's channel-index cache
    assert agreement.codec_fingerprint(out) == before
    other = make_codec("int4:g32+outliers", outlier_channels=[1, 3])
    assert agreement.codec_fingerprint(other) != before
    cs = make_codec("int4:g32+chscale", channel_scale_exponents=[0] * 16)
    before = agreement.codec_fingerprint(cs)
    cs.encode(torch.randn(4, 16))  # fills the codec's per-device scale cache
    assert agreement.codec_fingerprint(cs) == before
    changed = make_codec("int4:g32+chscale", channel_scale_exponents=[0] * 15 + [-1])
    assert agreement.codec_fingerprint(changed) != before


@pytest.mark.parametrize(
    "spec",
    ["int4:g32", "int8:g32", "int4:g32:asym", "fp8", "fp8-e5m2:b128", "mxfp4", "nvfp4", "fp5:b32", "int4:g32+had"]
    + ["int4:g32+outliers:k8", "int4:g32+outliers", "int4:g64:se4m3+had+chscale", "none"],
)
def test_using_a_codec_does_not_change_its_fingerprint(spec: str) -> None:
    """Ranks fingerprint their codec at first use, whatever they did with it before (a rank may have encoded
    locally, filled caches on another device...): state a codec sets while working must not enter the
    fingerprint. A codec that caches in a plain attribute instead of a dict breaks this and fails here."""
    from megatron_tpcomp import agreement

    extra = {}
    if spec.endswith("+outliers"):
        extra["outlier_channels"] = [1, 5]
    if spec.endswith("+chscale"):
        extra["channel_scale_exponents"] = [0, 1, -1, 2] * 16
    codec = make_codec(spec, **extra)
    before = agreement.codec_fingerprint(codec)
    x = torch.randn(6, 64, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    payloads = torch.cat([codec.encode(x), codec.encode(x * 2)])
    codec.decode_sum(payloads, 2, x.shape, torch.bfloat16)
    codec.decode(payloads[: codec.payload_nbytes(x.shape)], x.shape, torch.float32)
    assert agreement.codec_fingerprint(codec) == before
    assert agreement.codec_fingerprint(make_codec(spec, **extra)) == before  # and a fresh equal codec agrees


# --------------------------------------------------------------------- mismatches that used to hang


def _path_mismatch(rank: int, world_size: int, what: str) -> tuple[str, float]:
    x = _input(rank, (64, 64))
    kwargs: dict = {"algo": "one-shot"}
    if what == "algorithm":  # all-gather of payloads vs all-to-all of chunks
        kwargs["algo"] = "one-shot" if rank == 0 else "two-shot"
    elif what == "min_bytes":  # compressed (all-gather) vs stock all-reduce
        kwargs["min_bytes"] = 0 if rank == 0 else 1 << 20
    elif what == "chunking" and rank == 1:  # pipelined one-shot (several all-gathers) vs one all-gather
        chunking.PIPELINE_MIN_BYTES, chunking.PIPELINE_CHUNK_BYTES = 1 << 12, 1 << 12
    t0 = time.monotonic()
    try:
        collectives.all_reduce(x, "int4:g32", **kwargs)
    except CollectiveError as exc:
        return str(exc), time.monotonic() - t0
    return "<no error>", time.monotonic() - t0


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    ("what", "names"),
    [
        ("algorithm", ("one-shot", "two-shot")),
        ("min_bytes", ("one-shot", "stock (message of 16384 bytes is below the 1048576-byte minimum")),
        ("chunking", ("one-shot", "one-shot pipelined in 4 chunks")),
    ],
)
def test_a_path_mismatch_fails_fast_instead_of_hanging(what: str, names: tuple[str, str]) -> None:
    try:
        results = run_distributed(_path_mismatch, 2, what, timeout_s=40, pg_timeout_s=HANG_PG_TIMEOUT_S)
    except DistributedRunError as exc:  # a gloo timeout or a crash: what the check must prevent
        pytest.fail(f"{what} mismatch did not fail with a CollectiveError: {str(exc)[:600]}")
    for rank, (msg, elapsed) in enumerate(results):
        assert "ranks disagree on the message" in msg and "the algorithm, chunking or min_bytes decision" in msg, msg
        assert "rank 0: all_reduce of shape (64, 64) float32, codec 'int4:g32:sfp16'" in msg, msg
        assert names[0] in msg.split("rank 1: ")[0] and names[1] in msg.split("rank 1: ")[1], msg
        assert f"raised on rank {rank}" in msg
        # One tiny all-gather, not the process-group timeout (slack for a loaded 2-core machine).
        assert elapsed < HANG_PG_TIMEOUT_S - 1.0, elapsed


# ------------------------------------------------------------------------- when the exchange runs


def _exchange_counts(rank: int, world_size: int) -> dict:
    from megatron_tpcomp import agreement

    def count() -> int:
        return agreement.exchange_count()

    x = _input(rank)
    got = {"start": count()}
    for _ in range(3):
        collectives.all_reduce(x, "int4:g32")
    got["same_key_x3"] = count()
    collectives.all_reduce(_input(rank, (4, 64)), "int4:g32")
    got["new_shape"] = count()
    collectives.all_reduce(x, "int4:g32+had")
    got["new_codec"] = count()
    collectives.all_reduce(x, make_codec("int4:g32+had", hadamard_seed=3))
    got["new_seed"] = count()
    collectives.all_reduce(x, make_codec("int4:g32+had"))  # a new object equal to the cached spec's codec
    got["equal_codec_object"] = count()
    collectives.all_reduce(x, "int4:g32", algo="two-shot")
    got["new_algo"] = count()
    collectives.all_gather(x, "int4:g32")
    got["new_op"] = count()
    for _ in range(2):
        collectives.all_reduce(x, "int4:g32", check_ranks=False)
    got["off_x2"] = count()
    for _ in range(2):
        collectives.all_reduce(x, "int4:g32", check_ranks=True)
    got["always_x2"] = count()
    collectives.all_reduce(x, "int4:g32", check_ranks=False, check_finite=True)
    got["finite_only"] = count()
    got["bad_mode"] = _outcome(collectives.all_reduce, x, "int4:g32", check_ranks="sometimes")
    pair = dist.new_group([0, 1])  # another group: its own first use
    collectives.all_reduce(x, "int4:g32", pair)
    got["other_group"] = count()
    return got


def test_the_default_check_runs_once_per_fingerprint_and_group() -> None:
    for got in run_distributed(_exchange_counts, 2, timeout_s=90, pg_timeout_s=20):
        assert got["start"] == 0
        assert got["same_key_x3"] == 1  # first use only
        assert got["new_shape"] == 2 and got["new_codec"] == 3 and got["new_seed"] == 4
        assert got["equal_codec_object"] == 4  # the same fingerprint: already checked
        assert got["new_algo"] == 5 and got["new_op"] == 6
        assert got["off_x2"] == 6  # check_ranks=False: never
        assert got["always_x2"] == 8  # check_ranks=True: every call
        assert got["finite_only"] == 9  # check_finite needs the exchange (and compares the digests too)
        assert "check_ranks='sometimes'" in got["bad_mode"] and "'first', True or False" in got["bad_mode"]
        assert got["other_group"] == 10
