"""The kernel dispatch (megatron_tpcomp/backends/dispatch.py) with real codecs on CPU tensors: the choice per
device, format and ``TPCOMP_BACKEND``, its one log line, the replaced variables, forced backends that cannot run,
and the import direction (codecs/ imports nothing from backends/)."""

from __future__ import annotations

import ast
import logging
from pathlib import Path

import pytest
import torch

from megatron_tpcomp import backends
from megatron_tpcomp.backends import BackendUnavailableError, cpu, dispatch, te
from megatron_tpcomp.codecs import CodecError, make_codec
from megatron_tpcomp.codecs.base import ReferenceDispatcher, install_dispatcher
from megatron_tpcomp.codecs.fp8 import Fp8Codec
from megatron_tpcomp.spec import parse_spec

ROOT = Path(__file__).resolve().parents[2]
CPU = torch.device("cpu")
BF16 = torch.bfloat16


@pytest.fixture(autouse=True)
def _fresh(monkeypatch: pytest.MonkeyPatch):
    """No backend variable from the environment, no remembered choice from another test."""
    for name in (backends.ENV, *dispatch.REPLACED):
        monkeypatch.delenv(name, raising=False)
    backends.reset()
    yield
    backends.reset()


def _library() -> None:
    ok, why = cpu.available()
    assert ok, f"the CPU codec library must build here (g++ is part of the supported setup): {why}"


@pytest.mark.parametrize(
    ("spec", "backend"),
    [
        ("int4:g32", "cpu"),
        ("int4:g32+had", "cpu"),
        ("fp8", "cpu"),
        ("fp8+had:b64", "cpu"),
        ("int4:g96", "reference"),  # a super-block of 12288 values: past the library's tile
        ("int8:g32", "cpu"),
        ("int5:g64:se4m3+had", "cpu"),
        ("int6:g128+had:b128", "cpu"),
        ("int6:g32:asym", "reference"),
        ("fp8-e5m2", "reference"),
        ("nvfp4", "reference"),
        ("int4:g32+outliers:k4", "reference"),  # the wrapper: its inner int4:g32 still runs in the library
        ("none", "reference"),
    ],
)
def test_auto_on_cpu_tensors_picks_the_library_where_it_implements_the_format(spec: str, backend: str) -> None:
    _library()
    codec = make_codec(spec)
    for op in ("encode", "decode"):
        choice = backends.choose(codec, op, CPU, BF16)
        assert choice.backend == backend, (spec, op, choice)
        assert choice.reason.startswith("TPCOMP_BACKEND=auto")


def test_auto_on_cuda_tensors_ends_at_the_reference_without_gpu_backends() -> None:
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is visible: the CUDA backends may run")
    choice = backends.choose(make_codec("int4:g32"), "encode", "cuda", BF16)
    assert choice.backend == "reference"
    assert "cuda: " in choice.reason and "triton: " in choice.reason  # tried in order, each with its reason
    fp8 = backends.choose(make_codec("fp8"), "encode", "cuda", BF16)
    assert fp8.backend == "reference" and "te: " in fp8.reason


def test_forcing_reference_gives_the_library_bytes(monkeypatch: pytest.MonkeyPatch) -> None:
    _library()
    codec = make_codec("int4:g32+had")
    x = torch.randn(40, 576, generator=torch.Generator().manual_seed(0)).to(BF16)
    monkeypatch.setenv(backends.ENV, "cpu")
    assert backends.choose(codec, "encode", CPU, BF16).backend == "cpu"
    fused = codec.encode(x)
    fused_sum = codec.decode_sum(torch.cat([fused, fused]), 2, x.shape, BF16)
    monkeypatch.setenv(backends.ENV, "reference")
    assert backends.choose(codec, "encode", CPU, BF16).backend == "reference"
    assert torch.equal(codec.encode(x), fused)
    assert torch.equal(codec.decode_sum(torch.cat([fused, fused]), 2, x.shape, BF16), fused_sum)


def test_choice_is_logged_once_per_key(caplog: pytest.LogCaptureFixture) -> None:
    _library()
    codec = make_codec("int4:g32")
    x = torch.randn(4, 64).to(BF16)
    with caplog.at_level(logging.INFO, logger=dispatch.__name__):
        for _ in range(3):
            payload = codec.encode(x)
            codec.decode(payload, x.shape, BF16)
    lines = [r.getMessage() for r in caplog.records if r.name == dispatch.__name__]
    assert lines == [
        "megatron-tpcomp: int4:g32:sfp16 encode on cpu bfloat16: backend cpu "
        "(TPCOMP_BACKEND=auto: cpu implements this call and runs here)",
        "megatron-tpcomp: int4:g32:sfp16 decode on cpu bfloat16: backend cpu "
        "(TPCOMP_BACKEND=auto: cpu implements this call and runs here)",
    ]


def test_forced_backend_falls_back_for_formats_it_does_not_implement(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    _library()
    monkeypatch.setenv(backends.ENV, "cpu")
    codec = make_codec("int4:g32+outliers:k4")
    x = torch.randn(8, 256, generator=torch.Generator().manual_seed(1)).to(BF16)
    with caplog.at_level(logging.INFO, logger=dispatch.__name__):
        payload = codec.encode(x)
    text = caplog.text
    assert "int4:g32:sfp16+outliers:k4 encode on cpu bfloat16: backend reference (TPCOMP_BACKEND=cpu does not " in text
    assert "int4:g32:sfp16 encode on cpu bfloat16: backend cpu (TPCOMP_BACKEND=cpu)" in text  # the inner codec
    monkeypatch.setenv(backends.ENV, "reference")
    assert torch.equal(codec.encode(x), payload)


@pytest.mark.parametrize(
    ("forced", "reason"),
    [
        ("cuda", "the INT4 CUDA kernels run on CUDA tensors only, not cpu"),
        ("te", None),  # te implements fp8 only: an int4 codec falls back (below)
    ],
)
def test_forced_backend_that_cannot_run_raises(monkeypatch: pytest.MonkeyPatch, forced: str, reason: str) -> None:
    monkeypatch.setenv(backends.ENV, forced)
    x = torch.randn(64)
    if reason is None:
        assert backends.choose(make_codec("int4:g32"), "encode", CPU, x.dtype).backend == "reference"
        with pytest.raises(BackendUnavailableError, match="TPCOMP_BACKEND=te cannot run fp8-e4m3:b128:sfp32 encode"):
            make_codec("fp8").encode(x)
        return
    with pytest.raises(BackendUnavailableError, match=f"TPCOMP_BACKEND={forced} cannot run .*: {reason}"):
        make_codec("int4:g32").encode(x)


def test_te_claims_the_fp8_encode_plain_and_rotated() -> None:
    """Transformer Engine casts where the fp8 reference casts: the plain codec's and, inside ``+had``, the inner
    codec's (as before the dispatch existed); decoding and other formats stay with the reference."""
    assert te.unsupported(make_codec("fp8"), "encode") is None
    assert te.unsupported(make_codec("fp8-e5m2:b64+had"), "encode") is None
    assert "only encodes" in te.unsupported(make_codec("fp8"), "decode")
    assert "fp8 codecs only" in te.unsupported(make_codec("int4:g32+had"), "encode")


def test_forced_cpu_on_another_device_type_raises(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(backends.ENV, "cpu")
    with pytest.raises(BackendUnavailableError, match="CPU tensors only, not cuda"):
        backends.choose(make_codec("int4:g32"), "encode", "cuda", BF16)
    assert backends.choose(make_codec("nvfp4"), "encode", "cuda", BF16).backend == "reference"


def test_forced_triton_on_cpu_without_the_interpreter_raises(monkeypatch: pytest.MonkeyPatch) -> None:
    tc = dispatch.triton_module()
    if tc is not None and tc.INTERPRETED:
        pytest.skip("the Triton kernels were imported for the interpreter in this process")
    monkeypatch.setenv(backends.ENV, "triton")
    expected = "set TRITON_INTERPRET=1" if tc is not None else "triton does not import"
    with pytest.raises(BackendUnavailableError, match=f"TPCOMP_BACKEND=triton cannot run .*{expected}"):
        make_codec("int4:g32").encode(torch.ones(64))


@pytest.mark.parametrize(
    ("old", "value", "mapping"),
    [
        ("TPCOMP_CPU_KERNELS", "off", "auto -> auto, on -> cpu, off -> reference"),
        ("TPCOMP_GPU_KERNELS", "triton", "auto -> auto, triton -> triton, reference -> reference"),
    ],
)
def test_replaced_variables_raise(monkeypatch: pytest.MonkeyPatch, old: str, value: str, mapping: str) -> None:
    monkeypatch.setenv(old, value)
    with pytest.raises(CodecError, match=f"{old}='{value}' is no longer read: TPCOMP_BACKEND replaced it") as err:
        make_codec("int4:g32").encode(torch.ones(64))
    assert mapping in str(err.value) and "\n" not in str(err.value)


def test_bad_setting_is_one_line_naming_the_value(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(backends.ENV, "fast")
    with pytest.raises(CodecError, match="TPCOMP_BACKEND='fast' is not valid; expected one of auto, reference, cpu"):
        make_codec("int4:g32").encode(torch.ones(64))


def test_fp8_codec_backend_argument_routes_through_the_dispatch(monkeypatch: pytest.MonkeyPatch) -> None:
    cs = parse_spec("fp8")
    torch_codec, te_codec = Fp8Codec(cs, backend="torch"), Fp8Codec(cs, backend="te")
    monkeypatch.setenv(backends.ENV, "cpu")  # the codec's own argument wins over the variable
    choice = backends.choose(torch_codec, "encode", CPU, BF16)
    assert choice == backends.Choice("reference", "Fp8Codec(backend='torch')", "Fp8Codec(backend='torch')")
    assert backends.choose(te_codec, "decode", CPU, BF16).backend == "reference"  # te only encodes
    with pytest.raises(BackendUnavailableError, match=r"Fp8Codec\(backend='te'\) cannot run .* CUDA tensors only"):
        te_codec.encode(torch.ones(128))


def test_auto_falls_back_after_a_kernel_fails_on_its_first_call(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    _library()
    codec = make_codec("int4:g32")
    x = torch.randn(256).to(BF16)
    want = codec._encode(x)

    def broken(*args: object) -> torch.Tensor:
        raise RuntimeError("no kernel image is available for execution on the device")

    monkeypatch.setattr(cpu, "encode", broken)
    with caplog.at_level(logging.WARNING, logger=dispatch.__name__):
        assert torch.equal(codec.encode(x), want)
        assert torch.equal(codec.encode(x), want)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "no kernel image" in warnings[0].getMessage()
    assert backends.choose(codec, "encode", CPU, BF16).backend == "reference"
    backends.reset()
    monkeypatch.setenv(backends.ENV, "cpu")  # forced: the error is not hidden
    with pytest.raises(RuntimeError, match="no kernel image"):
        codec.encode(x)


def test_without_the_dispatcher_the_reference_runs() -> None:
    previous = install_dispatcher(None)
    try:
        codec = make_codec("int4:g32")
        x = torch.randn(300)
        assert torch.equal(codec.encode(x), codec._encode(x))
    finally:
        install_dispatcher(previous)
    assert isinstance(previous, backends.BackendDispatcher) and not isinstance(previous, ReferenceDispatcher)


def test_available_names_every_backend() -> None:
    assert backends.available("reference") == (True, "")
    for name in ("cpu", "triton", "cuda", "te"):
        ok, why = backends.available(name)
        assert ok or why, name
    with pytest.raises(CodecError, match="unknown backend 'fast'"):
        backends.available("fast")


def test_codecs_import_nothing_above_them() -> None:
    """codecs/ is below backends/: no import of megatron_tpcomp.backends (nor the old cpu_codecs, kernels, gpu)
    anywhere in codecs/, at module level or inside a function."""
    bad = []
    for path in sorted((ROOT / "megatron_tpcomp" / "codecs").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module, *(f"{node.module}.{a.name}" for a in node.names)]
            for name in names:
                top = name.split(".")[1] if name.startswith("megatron_tpcomp.") else ""
                if top in ("backends", "cpu_codecs", "kernels", "gpu", "collectives", "assets"):
                    bad.append(f"{path.name}: {name}")
    assert not bad, bad
