"""``tpcomp bench kernels``: the harness on the CPU (reference codecs), the byte accounting, the peak table, and
the refusal to run ``--device cuda`` where there is no GPU. Sizes and repetitions are tiny: these tests check the
records, not the speed (the target lives in the benchmark)."""

from __future__ import annotations

import json

import pytest
import torch

from megatron_tpcomp import backends
from megatron_tpcomp.bench import kernels as bench
from megatron_tpcomp.codecs import make_codec

RECORD_KEYS = {
    "kernel",
    "backend",
    "spec",
    "n_payloads",
    "device",
    "device_name",
    "nominal_gbps",
    "dtype",
    "requested_bytes",
    "bytes",
    "shape",
    "numel",
    "bytes_read",
    "bytes_written",
    "median_ms",
    "min_ms",
    "gbps",
    "pct_nominal",
    "copy_gbps",
    "pct_copy",
    "reps",
    "date",
}


def test_traffic_by_hand() -> None:
    # 4096 bf16 values: 8192 bytes in. int4:g32: 128 groups -> 2048 code bytes, then 128 fp16 scales (256 bytes) at
    # offset 2048 (already 16-aligned), then one int16 super-block exponent per 4096 values (2 bytes, padded to 16):
    # 2320 bytes, a multiple of 16.
    assert make_codec("int4:g32").payload_nbytes((4096,)) == 2320
    assert bench.traffic("int4_quantize", 4096, torch.bfloat16, group=32) == (8192, 2320)
    assert bench.traffic("int4_dequantize", 4096, torch.bfloat16, group=32) == (2320, 8192)
    assert bench.traffic("int4_dequantize_sum", 4096, torch.bfloat16, group=32, n_payloads=4) == (4 * 2320, 8192)
    assert bench.traffic("copy", 4096, torch.bfloat16) == (8192, 8192)
    # fp8 (e4m3, blocks of 128, fp32 scales): 4096 code bytes + 32 scales * 4 bytes + 16 (the exponent, padded) = 4240.
    assert bench.traffic("fp8_encode", 4096, torch.bfloat16, fp8_spec="fp8") == (8192, 4240)
    assert bench.traffic("fp8_decode", 4096, torch.float32, fp8_spec="fp8") == (4240, 16384)
    with pytest.raises(ValueError, match="unknown kernel"):
        bench.traffic("int4_bogus", 4096, torch.bfloat16)


@pytest.mark.parametrize(
    ("name", "gbps"),
    [
        ("NVIDIA H100 80GB HBM3", 3350.0),
        ("NVIDIA H100 PCIe", 2000.0),
        ("NVIDIA H200", 4800.0),
        ("NVIDIA A100-SXM4-80GB", 2039.0),
        ("NVIDIA A100-PCIE-40GB", 1555.0),
        ("NVIDIA L4", 300.0),
        ("NVIDIA L40S", 864.0),
        ("NVIDIA A10", 600.0),
        ("NVIDIA GeForce RTX 4090", None),
        ("NVIDIA GH200 480GB", None),
    ],
)
def test_nominal_bandwidth_lookup(name: str, gbps: float | None) -> None:
    assert bench.nominal_bandwidth(name)[1] == gbps


def test_cpu_harness_writes_records(tmp_path, capsys) -> None:
    out = tmp_path / "kernels.json"
    rc = bench.main(["--device", "cpu", "--sizes", "4KiB,8KiB", "--reps", "2", "--warmup", "1", "--json", str(out)])
    assert rc == 0
    text = capsys.readouterr().out
    assert "skipping backend 'cuda'" in text and "skipping backend 'te'" in text
    assert "target: no INT4 CUDA kernel record" in text
    records = json.loads(out.read_text())
    got = {(r["requested_bytes"], r["kernel"], r["backend"], r["n_payloads"]) for r in records}
    expected = {
        (size, kernel, backend, n)
        for size in (4 << 10, 8 << 10)
        for kernel, backend, n in [
            ("copy", "torch", 1),
            ("int4_quantize", "reference", 1),
            ("int4_dequantize", "reference", 1),
            ("int4_dequantize_sum", "reference", 2),
            ("int4_dequantize_sum", "reference", 4),
            ("fp8_encode", "reference", 1),
            ("fp8_decode", "reference", 1),
        ]
    }
    assert got == expected and len(records) == len(expected)
    for r in records:
        assert RECORD_KEYS <= r.keys()
        assert r["device"] == "cpu" and r["nominal_gbps"] is None and r["pct_nominal"] is None
        assert r["median_ms"] > 0 and r["gbps"] > 0 and r["copy_gbps"] > 0 and r["pct_copy"] > 0
        assert r["bytes"] == r["numel"] * 2 and r["numel"] == r["shape"][0] * r["shape"][1]
        assert (r["bytes_read"], r["bytes_written"]) == bench.traffic(
            r["kernel"], r["numel"], torch.bfloat16, n_payloads=r["n_payloads"]
        )
        assert r["gbps"] == pytest.approx((r["bytes_read"] + r["bytes_written"]) / (r["median_ms"] * 1e-3) / 1e9)


def test_run_kernel_subset_always_times_copy() -> None:
    records = bench.run([4 << 10], device="cpu", kernels=["int4_dequantize"], reps=1, warmup=0, log=lambda _: None)
    assert [(r["kernel"], r["backend"]) for r in records] == [("copy", "torch"), ("int4_dequantize", "reference")]
    assert records[1]["pct_copy"] == pytest.approx(100 * records[1]["gbps"] / records[0]["gbps"])


def test_target_lines() -> None:
    base = dict(backend="cuda", kernel="int4_quantize", n_payloads=1, requested_bytes=8 << 20, pct_copy=90.0)
    assert bench.target_lines([dict(base, pct_nominal=75.0)])[0].endswith("met")
    assert bench.target_lines([dict(base, pct_nominal=60.0)])[0].endswith("NOT met")
    unknown_device = bench.target_lines([dict(base, pct_nominal=None)])[0]
    assert "of copy bandwidth" in unknown_device and unknown_device.endswith("met")
    assert bench.target_lines([dict(base, pct_nominal=99.0, requested_bytes=64 << 10)])[0].startswith("target: no")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal where there is no CUDA device")
def test_cuda_without_gpu_exits_2_with_reason(capsys) -> None:
    assert bench.main(["--sizes", "4KiB"]) == 2
    err = capsys.readouterr().err
    assert "cannot benchmark the GPU kernels here" in err
    assert backends.available("cuda")[1] in err and backends.available("te")[1] in err
    with pytest.raises(backends.BackendUnavailableError, match="no CUDA device"):
        bench.run([4 << 10], device="cuda", log=lambda _: None)


@pytest.mark.parametrize(
    "argv",
    [["--sizes", "0"], ["--kernels", "int4_bogus"], ["--backends", "triton"], ["--group", "48"], ["--reps", "0"]],
)
def test_bad_arguments_exit_2(argv: list[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        bench.main(["--device", "cpu", *argv])
    assert exc.value.code == 2
