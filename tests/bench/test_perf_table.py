"""``tpcomp bench perf-table``: a table fitted to benchmark records, and predicted vs measured per record."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from megatron_tpcomp.bench.perf_table import main
from megatron_tpcomp.costmodel import CostModel, payload_bytes

MiB = 1 << 20


def _codec_records() -> list[dict]:
    # Encode 50 us + 0.3 GB/s, decode 20 us + 1 GB/s, at three sizes.
    return [
        {
            "canonical": "int4:g32:sfp16",
            "bytes": b,
            "encode_ms": 1e3 * (50e-6 + b / 0.3e9),
            "decode_ms": 1e3 * (20e-6 + b / 1e9),
        }
        for b in (16 * 1024, MiB, 8 * MiB)
    ]


def _collective_records(link: str = "1gbit") -> list[dict]:
    alpha, beta = 40e-6, 125e6
    out = []
    for b in (64 * 1024, MiB, 8 * MiB):
        stock = 2 * alpha + b / beta  # N = 2 ring: 2 steps, B bytes each way in total
        payload = b * 9 // 32
        comp = (50e-6 + b / 0.3e9) + (alpha + payload / beta) + 2 * (20e-6 + b / 1e9)
        out.append(
            {
                "op": "all_reduce",
                "spec": "int4:g32",
                "canonical": "int4:g32:sfp16",
                "algo": "one-shot",
                "world_size": 2,
                "bytes": b,
                "wire_bytes": payload,
                "link": link,
                "baseline_median_ms": 1e3 * stock,
                "median_ms": 1e3 * comp,
            }
        )
    return out


def test_fit_reproduces_the_records_it_was_fitted_on(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "c.json").write_text(json.dumps(_codec_records()))
    (tmp_path / "k.json").write_text(json.dumps(_collective_records() + _collective_records("none")))
    out = tmp_path / "perf.json"
    argv = ["--codecs", str(tmp_path / "c.json"), "--collectives", str(tmp_path / "k.json"), "--out", str(out)]
    assert main(argv) == 2 and "choose one with --link" in capsys.readouterr().err
    assert main([*argv, "--link", "1gbit"]) == 0
    text = capsys.readouterr().out
    assert "median |error| of the compressed-path prediction: 0% over 3 cases" in text
    model = CostModel.load(out)
    assert model.links[2].beta_bytes_per_s == pytest.approx(125e6, rel=1e-6)
    assert model.codecs["int4:g32:sfp16"].enc_bw == pytest.approx(0.3e9, rel=1e-6)


def test_payload_is_recovered_from_wire_bytes_for_every_path() -> None:
    assert payload_bytes({"op": "all_reduce", "algo": "one-shot", "world_size": 3, "wire_bytes": 200}) == 100
    assert payload_bytes({"op": "all_reduce", "algo": "two-shot", "world_size": 4, "wire_bytes": 150}) == 100
    assert payload_bytes({"op": "reduce_scatter", "world_size": 4, "wire_bytes": 75}) == 100
    assert payload_bytes({"op": "all_gather", "world_size": 5, "wire_bytes": 400}) == 100


def test_bad_inputs_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--codecs", str(tmp_path / "missing.json"), "--out", str(tmp_path / "o.json")]) == 2
    assert "cannot read benchmark records" in capsys.readouterr().err
    (tmp_path / "c.json").write_text(json.dumps(_codec_records()))
    (tmp_path / "k.json").write_text(json.dumps(_collective_records()))
    argv = ["--codecs", str(tmp_path / "c.json"), "--collectives", str(tmp_path / "k.json"), "--link", "5gbit"]
    assert main([*argv, "--out", str(tmp_path / "o.json")]) == 2
    assert "no collective records for --link 5gbit" in capsys.readouterr().err
