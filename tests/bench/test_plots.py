"""``tpcomp bench plot``: PNGs from collectives and e2e records (records built here with the benchmarks' keys:
running the benchmarks would take minutes), and clear errors, exit 2 and no PNG for unusable input."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from megatron_tpcomp.bench import collectives as bench_collectives
from megatron_tpcomp.bench import plots

matplotlib = pytest.importorskip("matplotlib", reason="tpcomp bench plot needs matplotlib (scripts/setup_venv.sh)")
from matplotlib import image as mpimg  # noqa: E402

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def collective_records() -> list[dict]:
    """Records shaped like `tpcomp bench collectives --json`: 2 links x 2 all-reduce algorithms x 2 specs x 3 sizes,
    plus all-gather at world size 4 (so 3 panels), with the actual (whole-row) byte counts of the benchmark."""
    out = []
    for link in ("none", "1gbit"):
        for op, world, algos in (("all_reduce", 2, ("one-shot", "two-shot")), ("all_gather", 4, ("all-gather",))):
            if op == "all_gather" and link == "none":
                continue
            for algo in algos:
                for spec, gain in (("int4:g32", 3.0), ("fp8", 1.8)):
                    for i, requested in enumerate((64 << 10, 1 << 20, 8 << 20)):
                        rows = requested // (2 * 576)
                        stock = 0.5 + 8 * requested / 1e6
                        speedup = 1 + (gain - 1) * i / 2 if link == "1gbit" else 0.8
                        out.append(
                            dict(
                                op=op,
                                spec=spec,
                                algo=algo,
                                algo_used=algo,
                                world_size=world,
                                bytes=rows * 576 * 2,
                                requested_bytes=requested,
                                link=link,
                                median_ms=stock / speedup,
                                baseline_median_ms=stock,
                                speedup=speedup,
                                wire_bytes=rows * 576 * 2 // 3,
                                dtype="bfloat16",
                                link_info={"rate": link, "shaped": link != "none"},
                            )
                        )
    return out


def e2e_records(with_baseline: bool = True) -> list[dict]:
    """Records with the keys of `tpcomp bench e2e --json`, the uncompressed run as spec "none"; with
    ``with_baseline`` False only the keys the plot needs plus a few (no "none" records, no baseline keys)."""
    out = []
    specs = (("none", 1.0), ("int4:g32", 0.6), ("fp8", 0.75))
    for spec, factor in specs if with_baseline else specs[1:]:
        for prompt_len in (128, 512, 2048):
            base = 5 + prompt_len * 0.05
            rec = dict(spec=spec, prompt_len=prompt_len, ttft_ms=base * factor, tpot_ms=9.0, link="1gbit", world_size=2)
            if with_baseline:
                rec.update(
                    baseline_ttft_ms=base,
                    baseline_tpot_ms=9.0,
                    speedup=1 / factor,
                    tpot_speedup=1.0,
                    comm_share=0.4,
                    link_info={"rate": "1gbit", "shaped": True},
                    reps=3,
                    wire_bytes=1000,
                    model="SmolLM2-135M",
                )
            out.append(rec)
    return out


def write(path: Path, data: object) -> str:
    path.write_text(json.dumps(data))
    return str(path)


def assert_png(path: Path, ncols: int, nrows: int) -> None:
    data = path.read_bytes()
    assert len(data) > 1000 and data[:8] == PNG_MAGIC
    img = mpimg.imread(path)
    width, height = plots.figure_pixels(ncols, nrows)
    assert img.shape[:2] == (height, width)
    assert img[..., :3].std() > 0.05  # something was drawn


def test_records_carry_the_collectives_benchmark_keys() -> None:
    assert all(set(bench_collectives.REQUIRED_KEYS) <= r.keys() for r in collective_records())


def test_records_carry_the_e2e_benchmark_keys() -> None:
    e2e = pytest.importorskip("megatron_tpcomp.bench.e2e", reason="tpcomp bench e2e is not in this checkout")
    assert all(set(e2e.REQUIRED_KEYS) <= r.keys() for r in e2e_records())
    assert plots.E2E_BASELINE_SPEC == e2e.BASELINE


def test_plot_both(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    coll = write(tmp_path / "coll.json", collective_records())
    e2e = write(tmp_path / "e2e.json", {"model": "SmolLM2-135M", "records": e2e_records()})
    out = tmp_path / "img"
    assert plots.main(["--collectives", coll, "--e2e", e2e, "--out-dir", str(out)]) == 0
    printed = capsys.readouterr().out
    png_coll, png_e2e = out / plots.COLLECTIVES_PNG, out / plots.E2E_PNG
    assert f"wrote {png_coll}" in printed and f"wrote {png_e2e}" in printed
    assert sorted(p.name for p in out.iterdir()) == sorted([plots.COLLECTIVES_PNG, plots.E2E_PNG])  # no temp left
    # panels: (none, all_reduce, 2), (1gbit, all_reduce, 2), (1gbit, all_gather, 4) -> 3 columns, 1 row
    assert_png(png_coll, 3, 1)
    # one (link, world size) group; TTFT row and speedup row
    assert_png(png_e2e, 1, 2)


def test_plot_functions_return_paths(tmp_path: Path) -> None:
    path = str(tmp_path / "c.png")
    one_panel = [r for r in collective_records() if r["link"] == "1gbit" and r["op"] == "all_reduce"]
    assert plots.plot_collectives(one_panel, path) == path
    assert_png(Path(path), 1, 1)
    # e2e without the optional baseline keys: TTFT row only
    path = str(tmp_path / "e.png")
    assert plots.plot_e2e(e2e_records(with_baseline=False), path) == path
    assert_png(Path(path), 1, 1)
    assert plots.plot(e2e=write(tmp_path / "e.json", e2e_records()), out_dir=tmp_path / "new") == [
        str(tmp_path / "new" / plots.E2E_PNG)
    ]


def test_size_text() -> None:
    assert [plots.size_text(n) for n in (64 << 10, 8 << 20, 3 << 19, 16128, 512, 1 << 30)] == [
        "64 KiB",
        "8 MiB",
        "1.5 MiB",
        "15.8 KiB",
        "512 B",
        "1 GiB",
    ]


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "no such file"),
        ("{not json", "not JSON"),
        ('{"a": 1}', "not a list of records"),
        ("[]", "no collectives records"),
        (json.dumps(e2e_records()), "no collectives records"),  # the other benchmark's file
        (json.dumps([dict(r, speedup=None) for r in collective_records()]), "no collectives records"),
    ],
)
def test_bad_collectives_input(tmp_path: Path, capsys: pytest.CaptureFixture[str], content: str | None, message: str):
    path = tmp_path / "coll.json"
    if content is not None:
        path.write_text(content)
    out = tmp_path / "img"
    assert plots.main(["--collectives", str(path), "--out-dir", str(out)]) == 2
    err = capsys.readouterr().err
    assert message in err and str(path) in err and "tpcomp bench collectives --json" in err
    assert not out.exists()


def test_bad_e2e_input_writes_nothing(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    coll = write(tmp_path / "coll.json", collective_records())
    e2e = write(tmp_path / "e2e.json", collective_records())  # collectives records given as e2e
    out = tmp_path / "img"
    assert plots.main(["--collectives", coll, "--e2e", e2e, "--out-dir", str(out)]) == 2
    err = capsys.readouterr().err
    assert "no e2e records" in err and e2e in err and "prompt_len" in err
    assert not out.exists()  # the good collectives file was not plotted either


def test_failed_save_leaves_no_png(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from matplotlib.figure import Figure

    def broken_savefig(self, fname, **kwargs):
        Path(fname).write_bytes(PNG_MAGIC)  # half a file, then the failure
        raise OSError("disk full")

    monkeypatch.setattr(Figure, "savefig", broken_savefig)
    with pytest.raises(OSError, match="disk full"):
        plots.plot_collectives(collective_records(), str(tmp_path / plots.COLLECTIVES_PNG))
    assert list(tmp_path.iterdir()) == []


def test_needs_an_input() -> None:
    with pytest.raises(SystemExit) as exc:
        plots.main([])
    assert exc.value.code == 2
    with pytest.raises(plots.PlotError, match="nothing to plot"):
        plots.plot()


def test_missing_matplotlib_is_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` now raises ImportError
    coll = write(tmp_path / "coll.json", collective_records())
    assert plots.main(["--collectives", coll, "--out-dir", str(tmp_path / "img")]) == 2
    err = capsys.readouterr().err
    assert "needs the package matplotlib" in err and "pip install matplotlib==" in err
    assert not (tmp_path / "img").exists()


ROOT = Path(__file__).resolve().parents[2]


def test_iqr_of_per_repetition_speedups() -> None:
    # ratios 20/10, 20/20, 20/30, 20/40 = 2, 1, 0.667, 0.5; inclusive quartiles of the sorted 4 values:
    # q1 = 0.5 + 0.75 * (0.667 - 0.5) = 0.625, q3 = 1 + 0.25 * (2 - 1) = 1.25.
    q1, q3 = plots._ratio_spread([20.0] * 4, [10.0, 20.0, 30.0, 40.0], None)
    assert q1 == pytest.approx(0.625) and q3 == pytest.approx(1.25)
    # Unequal repetition counts: the baseline's median over each compressed repetition.
    assert plots._ratio_spread([1.0], [10.0, 40.0], 20.0) == pytest.approx((20 / 40 + 0.25 * 1.5, 2 - 0.25 * 1.5))
    assert plots._ratio_spread([20.0], [10.0], 20.0) is None  # one repetition: no spread to show


def _figures(monkeypatch: pytest.MonkeyPatch) -> list:
    """The figures the plots draw (kept when they are saved), to look at their lines and axes."""
    figs: list = []
    real_save = plots._save

    def keep(fig, path):  # noqa: ANN001, ANN202 - same signature as plots._save
        figs.append(fig)
        return real_save(fig, path)

    monkeypatch.setattr(plots, "_save", keep)
    return figs


def test_committed_runs_plot_with_iqr_bars_ideal_lines_and_a_useful_y_range(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    figs = _figures(monkeypatch)
    bench = ROOT / "docs" / "bench"
    written = plots.plot(
        collectives=[bench / "coll_ws2_v2.json", bench / "coll_ws3.json"], e2e=bench / "e2e_v2.json", out_dir=tmp_path
    )
    assert_png(Path(written[0]), 3, 1)  # (1gbit, N=2), (1gbit, N=3), (loopback, N=3)
    assert_png(Path(written[1]), 2, 2)
    coll, e2e = figs
    titles = [ax.get_title() for ax in coll.axes]
    assert titles == [
        "all_reduce, world size 2, link 1gbit",
        "all_reduce, world size 3, link 1gbit",
        "all_reduce, world size 3, link none (loopback, unshaped)",
    ]
    shaped, _, loopback = coll.axes
    # Ideal = stock / compressed bytes: INT4 one-shot at N=2 sends 3.56x fewer bytes, fp8 1.94x (the JSON's
    # baseline_wire_bytes / wire_bytes); dotted, on shaped links only.
    dotted = [line for line in shaped.lines if line.get_linestyle() == ":" and len(line.get_ydata())]
    ideal = sorted({round(float(line.get_ydata()[0]), 2) for line in dotted})
    assert 1.94 in ideal and 3.56 in ideal, ideal
    assert not [line for line in loopback.lines if line.get_linestyle() == ":" and len(line.get_xdata())]
    # IQR error bars: matplotlib draws them as LineCollections, one per spec line with spread.
    assert len(shaped.collections) >= 3
    # The y range spans the data and 1.0 (the N=2 shaped speedups are 1.66-3.16, ideal 3.56), not 0..max.
    lo, hi = shaped.get_ylim()
    assert 0.5 < lo < 1.0 and 3.56 < hi < 4.0, (lo, hi)
    # e2e: the speedup panel of the shaped link starts near 1, not at 0 (speedups 1.2-1.36, ideal 1.54).
    speed_1gbit = e2e.axes[2]
    assert speed_1gbit.get_title() == "TTFT speedup, world size 3, link 1gbit"
    lo, hi = speed_1gbit.get_ylim()
    assert 0.9 < lo < 1.0 and 1.54 < hi < 1.7, (lo, hi)
    assert len(speed_1gbit.collections) >= 3  # IQR bars of the three specs


def test_collectives_panels_follow_the_links_then_the_op_order_then_the_world_size() -> None:
    def rec(link: str, op: str, n: int) -> dict:
        return {"link": link, "op": op, "world_size": n}

    records = [
        rec("1gbit", "reduce_scatter", 4),
        rec("none", "all_reduce", 2),
        rec("1gbit", "all_gather", 2),
        rec("1gbit", "all_reduce", 4),
        rec("1gbit", "broadcast", 2),  # an operation outside OP_ORDER goes after those in it
    ]
    assert plots._collectives_panels(records) == [
        ("1gbit", "all_reduce", 4),
        ("1gbit", "all_gather", 2),
        ("1gbit", "reduce_scatter", 4),
        ("1gbit", "broadcast", 2),
        ("none", "all_reduce", 2),
    ]  # only combinations that have records: no (1gbit, all_reduce, 2), no (none, *, 4)


def test_e2e_title_names_the_one_model_the_world_sizes_and_the_links() -> None:
    recs = [
        {"spec": "none", "link": "1gbit", "world_size": 3, "model": "smol"},
        {"spec": "int4:g32", "link": "none", "world_size": 3, "model": "smol"},
    ]
    title = plots._e2e_title(recs)
    assert title.startswith("End to end (smol): time to first token vs prompt length")
    assert title.endswith("; world size 3; link 1gbit, link none (loopback, unshaped)")
    two_models = plots._e2e_title([recs[0], {**recs[1], "model": "other", "world_size": None}])
    assert two_models.startswith("End to end: ") and "; world size 3; " in two_models


def test_e2e_speedup_points_pair_the_repetitions_with_the_baselines() -> None:
    recs = [
        {"prompt_len": 128, "speedup": 1.5, "ttft_times_ms": [10.0, 20.0, 30.0, 40.0]},
        {"prompt_len": 512, "baseline_ttft_ms": 30.0, "ttft_ms": 20.0},  # speedup from the baseline: 1.5
        {"prompt_len": 1024, "ttft_ms": 20.0},  # no speedup: left out
    ]
    points = plots._e2e_speedup_points(recs, {128: [20.0] * 4})
    assert [p[:2] for p in points] == [(128.0, 1.5), (512.0, 1.5)]
    assert points[0][2] == pytest.approx((0.625, 1.25)) and points[1][2] is None
