"""PNG plots of the benchmark JSON: ``tpcomp bench plot``.

    tpcomp bench collectives --link none,1gbit --sizes 64KiB,1MiB,8MiB --json coll.json
    tpcomp bench e2e ... --json e2e.json
    tpcomp bench plot --collectives coll.json [coll_ws3.json ...] --e2e e2e.json --out-dir docs/img

Writes, in ``--out-dir`` (default ``docs/img``):

- ``collectives_speedup.png`` (from ``--collectives``, one or more files): speedup = stock / compressed (codec time
  included) vs the per-rank message size (log axis), one panel per (link, operation, world size), one line per
  codec spec (and all-reduce algorithm when the files have several), a dashed line at 1.0 (no gain). Error bars:
  the interquartile range of the per-repetition speedups (``baseline_times_ms[i] / times_ms[i]``: the benchmark
  alternates stock and compressed within a repetition). On shaped links a dotted line per spec shows the ideal,
  ``baseline_wire_bytes / wire_bytes`` (the speedup if the link were the only cost); loopback gets none, as the
  link is nearly free there. The y axis spans the drawn values and 1.0, not 0 to the maximum.
- ``e2e_ttft.png`` (from ``--e2e``): time to first token vs prompt length, one panel per (link, world size), one
  line per spec (spec ``none``, the uncompressed run, black dashed; without such records the ``baseline_ttft_ms`` they
  carry), and below it the TTFT speedup (``speedup``, or ``baseline_ttft_ms / ttft_ms``) where the records have it.
  Error bars: IQR of ``ttft_times_ms`` (top) and of the per-repetition speedups against the ``none`` record's
  repetitions (bottom); dotted on shaped links: the records' ``ideal_speedup`` (measured communication time
  scaled by the byte ratio, codec free).

Inputs are the files ``--json`` writes: a JSON list of records, or an object whose ``records`` is that list.
Records without the keys a plot needs are left out; a file that cannot be read, is not JSON or has no usable
record is an error (exit 2) and nothing is written. Each PNG is written under a temporary name in the output
folder and renamed, so a failed run never leaves a half-written PNG under the final name.

Figures are ``PANEL_SIZE_IN`` inches per panel at ``DPI`` dots per inch (see :func:`figure_pixels`), drawn with
matplotlib's Agg canvas (no display needed). From Python: :func:`plot`.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import textwrap
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

DEFAULT_OUT_DIR = os.path.join("docs", "img")
COLLECTIVES_PNG = "collectives_speedup.png"
E2E_PNG = "e2e_ttft.png"
#: Width and height of one panel in inches, and the resolution: a panel is 500 x 375 pixels.
PANEL_SIZE_IN = (5.0, 3.75)
DPI = 100
MAX_COLUMNS = 3
#: Keys a record needs to be plotted (others are optional).
COLLECTIVES_KEYS = ("op", "spec", "world_size", "bytes", "link", "speedup")
E2E_KEYS = ("spec", "prompt_len", "ttft_ms")
OP_ORDER = ("all_reduce", "all_gather", "reduce_scatter")
#: The spec of the uncompressed run in e2e records (drawn dashed, "(stock)"; its speedup is the line at 1.0).
E2E_BASELINE_SPEC = "none"
MATPLOTLIB_HINT = "pip install matplotlib==3.11.2 (scripts/setup_venv.sh installs it)"


class PlotError(ValueError):
    """Unusable input (missing file, not JSON, no records of the expected kind) or matplotlib missing."""


# ------------------------------------------------------------------------------------------------------ input


def load_records(path: str | os.PathLike, kind: str, required: Sequence[str], producer: str) -> list[dict[str, Any]]:
    """The records of ``path`` that have every key of ``required`` (with a finite number for numeric ones).

    Args:
        path: a JSON list of records, or an object whose ``records`` is that list.
        kind: what the records are (for messages), e.g. ``"collectives"``.
        required: keys each record needs.
        producer: the command that writes such a file (for messages).

    Raises:
        PlotError: the file is missing or unreadable, is not JSON, or has no such record.
    """
    expected = f"expected the JSON of `{producer} --json` (a list of {kind} records with keys {', '.join(required)})"
    try:
        text = Path(path).read_text()
    except FileNotFoundError:
        raise PlotError(f"{path}: no such file; {expected}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise PlotError(f"{path}: cannot read it ({exc}); {expected}") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise PlotError(f"{path}: not JSON ({exc}); {expected}") from None
    if isinstance(data, dict) and "records" in data:
        data = data["records"]
    if not isinstance(data, list):
        raise PlotError(f"{path}: a JSON {type(data).__name__}, not a list of records; {expected}")
    records = [r for r in data if isinstance(r, dict) and _usable(r, required)]
    if not records:
        raise PlotError(f"{path}: no {kind} records among its {len(data)} entries; {expected}")
    return records


def _usable(rec: Mapping[str, Any], required: Sequence[str]) -> bool:
    for key in required:
        value = rec.get(key)
        if value is None:
            return False
        if isinstance(value, bool):
            return False
        if isinstance(value, int | float) and not math.isfinite(value):
            return False
    return True


def _finite(value: Any) -> float | None:
    if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    return None


# ------------------------------------------------------------------------------------------------------ helpers


def size_text(nbytes: float) -> str:
    """'64 KiB', '8 MiB', '1.5 MiB', '15.8 KiB', '512 B': tick labels of message sizes."""
    for unit, mult in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if nbytes >= mult:
            v = nbytes / mult
            return f"{v:.0f} {unit}" if v == int(v) else f"{v:.3g} {unit}"
    return f"{nbytes:.0f} B"


def figure_pixels(ncols: int, nrows: int) -> tuple[int, int]:
    """(width, height) in pixels of a figure of ``ncols x nrows`` panels."""
    return round(ncols * PANEL_SIZE_IN[0] * DPI), round(nrows * PANEL_SIZE_IN[1] * DPI)


def _matplotlib() -> tuple[Any, Any, Any]:
    """(Figure class, Agg canvas class, matplotlib) imported on first use, or PlotError naming the package."""
    try:
        import matplotlib
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as exc:
        raise PlotError(
            f"tpcomp bench plot needs the package matplotlib, which does not import ({exc}); {MATPLOTLIB_HINT}"
        ) from None
    return Figure, FigureCanvasAgg, matplotlib


def _new_figure(ncols: int, nrows: int, title: str) -> tuple[Any, list[list[Any]]]:
    """An Agg figure of ``nrows x ncols`` panels (constrained layout: the pixel size is exactly
    :func:`figure_pixels`), and its axes as rows of columns."""
    figure_cls, canvas_cls, _ = _matplotlib()
    fig = figure_cls(figsize=(ncols * PANEL_SIZE_IN[0], nrows * PANEL_SIZE_IN[1]), dpi=DPI, layout="constrained")
    canvas_cls(fig)
    axes = fig.subplots(nrows, ncols, squeeze=False)
    # wrapped to the figure's width (about 10 characters per inch at 10 pt), never cut off at the edges
    fig.suptitle(textwrap.fill(title, width=int(ncols * PANEL_SIZE_IN[0] * 10)), fontsize=10)
    return fig, [list(row) for row in axes]


def _colors(labels: Sequence[str]) -> dict[str, Any]:
    """One color per label, the same in every panel."""
    _, _, mpl = _matplotlib()
    cmap = mpl.colormaps["tab10"]
    return {label: cmap(i % 10) for i, label in enumerate(labels)}


def _log2_x(ax: Any, xs: Sequence[float], fmt: Callable[[float], str]) -> None:
    """Log-2 x axis with one labelled tick per measured x, no minor ticks."""
    from matplotlib.ticker import FixedLocator, NullLocator

    ax.set_xscale("log", base=2)
    ticks = sorted(set(xs))
    ax.xaxis.set_major_locator(FixedLocator(ticks))
    ax.set_xticklabels([fmt(t) for t in ticks], fontsize=8, rotation=30 if len(ticks) > 4 else 0)
    ax.xaxis.set_minor_locator(NullLocator())
    if len(ticks) == 1:
        ax.set_xlim(ticks[0] / 2, ticks[0] * 2)


def _median_by_x(points: Sequence[tuple[float, float]]) -> tuple[list[float], list[float]]:
    """Points sorted by x, repeated x values merged to the median y."""
    by_x: dict[float, list[float]] = {}
    for x, y in points:
        by_x.setdefault(x, []).append(y)
    xs = sorted(by_x)
    return xs, [statistics.median(by_x[x]) for x in xs]


def _iqr(values: Sequence[float]) -> tuple[float, float] | None:
    """(25th, 75th percentile) of ``values`` (linear interpolation between the sorted values, so 2 values give
    the points a quarter of the way in from each end), or None for fewer than 2 values."""
    vals = sorted(v for v in values if math.isfinite(v))
    if len(vals) < 2:
        return None
    q = statistics.quantiles(vals, n=4, method="inclusive")
    return q[0], q[2]


def _ratio_spread(base_times: Any, times: Any, base_median: float | None) -> tuple[float, float] | None:
    """IQR of the per-repetition speedups ``base_times[i] / times[i]`` (the benchmarks alternate the stock and
    the compressed run within each repetition, so repetition i of both saw the same machine state); with unequal
    or missing baseline repetitions, ``base_median / times[i]``. None without at least 2 repetitions."""
    if not isinstance(times, list) or len(times) < 2:
        return None
    t = [_finite(v) for v in times]
    if isinstance(base_times, list) and len(base_times) == len(times):
        b = [_finite(v) for v in base_times]
        ratios = [bi / ti for bi, ti in zip(b, t, strict=True) if bi is not None and ti]
    elif base_median is not None:
        ratios = [base_median / ti for ti in t if ti]
    else:
        return None
    return _iqr(ratios)


def _merge_by_x(
    points: Sequence[tuple[float, float, tuple[float, float] | None]],
) -> tuple[list[float], list[float], list[float], list[float]]:
    """Points (x, y, IQR or None) sorted by x, repeated x merged (median y, widest IQR); returns xs, ys and the
    error-bar lengths below and above each y (0 where there is no spread)."""
    by_x: dict[float, list[tuple[float, tuple[float, float] | None]]] = {}
    for x, y, q in points:
        by_x.setdefault(x, []).append((y, q))
    xs = sorted(by_x)
    ys, lo, hi = [], [], []
    for x in xs:
        y = statistics.median(v for v, _ in by_x[x])
        qs = [q for _, q in by_x[x] if q is not None]
        ys.append(y)
        lo.append(max(0.0, y - min(q[0] for q in qs)) if qs else 0.0)
        hi.append(max(0.0, max(q[1] for q in qs) - y) if qs else 0.0)
    return xs, ys, lo, hi


def _speedup_ylim(ax: Any, values: Sequence[float]) -> None:
    """A speedup axis spanning the drawn values (error bars and ideal lines included) and 1.0 with a small
    margin: the range that matters, not 0 to the maximum."""
    vals = [v for v in values if math.isfinite(v)] + [1.0]
    lo, hi = min(vals), max(vals)
    pad = 0.08 * (hi - lo) if hi > lo else 0.1
    ax.set_ylim(max(0.0, lo - pad), hi + pad)


def _draw(ax: Any, points: Sequence[tuple[float, float, tuple[float, float] | None]], **style: Any) -> list[float]:
    """A line with IQR error bars (capped) where the points have them; returns every y drawn (bar ends too)."""
    xs, ys, lo, hi = _merge_by_x(points)
    if any(lo) or any(hi):
        ax.errorbar(xs, ys, yerr=[lo, hi], capsize=3, elinewidth=1, **style)
    else:
        ax.plot(xs, ys, **style)
    return [y - d for y, d in zip(ys, lo, strict=True)] + [y + d for y, d in zip(ys, hi, strict=True)]


def _ideal_legend(ax: Any) -> None:
    """One legend entry for the dotted ideal lines (they share the colors of their specs)."""
    ax.plot([], [], color="0.35", linestyle=":", linewidth=1.5, label="ideal: stock / compressed bytes")


def _link_text(link: Any, info: Mapping[str, Any] | None = None) -> str:
    if link is None:
        return "link ?"
    if str(link) == "none":
        requested = (info or {}).get("requested")
        return f"link none (loopback, unshaped{f'; {requested} not possible' if requested else ''})"
    return f"link {link}"


def _save(fig: Any, path: str) -> str:
    """Write ``fig`` as PNG under a temporary name next to ``path``, then rename it to ``path``."""
    folder, name = os.path.split(path)
    tmp = os.path.join(folder, f".{name}.{os.getpid()}.tmp")
    try:
        fig.savefig(tmp, format="png", dpi=DPI)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def _grid(n: int) -> tuple[int, int]:
    ncols = min(n, MAX_COLUMNS)
    return ncols, -(-n // ncols)


# ------------------------------------------------------------------------------------------------------ plots


def _shaped(recs: Sequence[Mapping[str, Any]], link: Any) -> bool:
    """Whether the records ran on a shaped (slow) link: their ``shaped`` flag, else a link other than none."""
    flags = [r["shaped"] for r in recs if isinstance(r.get("shaped"), bool)]
    return any(flags) if flags else str(link) != "none"


def _algo(rec: Mapping[str, Any]) -> str:
    algo, used = rec.get("algo"), rec.get("algo_used")
    if algo and used and used != algo:
        return f"{algo}>{used}"
    return str(algo or used or "")


def plot_collectives(records: Sequence[Mapping[str, Any]], path: str) -> str:
    """``collectives_speedup.png``: speedup vs message size; see the module docstring. Returns ``path``."""
    records = [r for r in records if _usable(r, COLLECTIVES_KEYS)]
    if not records:
        raise PlotError(f"no collectives records with keys {', '.join(COLLECTIVES_KEYS)} to plot")
    several_algos = len({_algo(r) for r in records if r["op"] == "all_reduce"}) > 1

    def label(r: Mapping[str, Any]) -> str:
        return f"{r['spec']} {_algo(r)}" if several_algos and _algo(r) else str(r["spec"])

    panels = _collectives_panels(records)
    labels = list(dict.fromkeys(label(r) for r in records))
    colors = _colors(labels)
    ncols, nrows = _grid(len(panels))
    fig, axes = _new_figure(ncols, nrows, _collectives_title(records))
    for i, (lk, op, n) in enumerate(panels):
        recs = [r for r in records if str(r["link"]) == lk and r["op"] == op and int(r["world_size"]) == n]
        info = next((r.get("link_info") for r in recs if isinstance(r.get("link_info"), dict)), None)
        title = f"{op}, world size {n}, {_link_text(lk, info)}"
        _collectives_panel(axes[i // ncols][i % ncols], recs, labels, label, colors, _shaped(recs, lk), title)
    for j in range(len(panels), ncols * nrows):
        axes[j // ncols][j % ncols].set_visible(False)
    return _save(fig, path)


def _collectives_panels(records: Sequence[Mapping[str, Any]]) -> list[tuple[str, str, int]]:
    """The panels of the collectives figure, ``(link, op, world size)`` for every combination with records: links
    in the order of the records, operations in :data:`OP_ORDER` (others after, by name), world sizes ascending."""
    links = list(dict.fromkeys(str(r["link"]) for r in records))
    ops = sorted({r["op"] for r in records}, key=lambda op: (OP_ORDER + (op,)).index(op))
    worlds = sorted({int(r["world_size"]) for r in records})
    return [
        (lk, op, n)
        for lk in links
        for op in ops
        for n in worlds
        if any(str(r["link"]) == lk and r["op"] == op and int(r["world_size"]) == n for r in records)
    ]


def _collectives_title(records: Sequence[Mapping[str, Any]]) -> str:
    """The collectives figure's title: what is drawn, the world sizes, the links and the message dtypes."""
    links = list(dict.fromkeys(str(r["link"]) for r in records))
    worlds = sorted({int(r["world_size"]) for r in records})
    dtypes = sorted({str(r["dtype"]) for r in records if r.get("dtype")})
    return (
        "Compressed vs stock collectives: speedup = stock / compressed time (codec work included), median and IQR "
        "over the repetitions; dotted: the byte ratio (shaped links); "
        f"world size {', '.join(map(str, worlds))}; {', '.join(_link_text(lk) for lk in links)}"
        + (f"; {', '.join(dtypes)} messages" if dtypes else "")
    )


def _collectives_panel(
    ax: Any,
    recs: Sequence[Mapping[str, Any]],
    labels: Sequence[str],
    label: Callable[[Mapping[str, Any]], str],
    colors: Mapping[str, Any],
    shaped: bool,
    title: str,
) -> None:
    """One panel of the collectives figure: a speedup line per label with IQR bars, its ideal (dotted) on a shaped
    link, and the stock line at 1.0."""
    all_x: list[float] = []
    drawn: list[float] = []
    any_ideal = False
    for lab in labels:
        mine = [r for r in recs if label(r) == lab]
        if not mine:
            continue
        pts = [
            (
                float(r.get("requested_bytes") or r["bytes"]),
                float(r["speedup"]),
                _ratio_spread(r.get("baseline_times_ms"), r.get("times_ms"), _finite(r.get("baseline_median_ms"))),
            )
            for r in mine
        ]
        drawn += _draw(ax, pts, marker="o", color=colors[lab], label=lab)
        all_x += [p[0] for p in pts]
        # Ideal on a shaped link: the link is the cost and the codec free, so time scales with the bytes.
        # On loopback the link is nearly free and the bytes say nothing about time: no ideal drawn.
        ideal = [
            (float(r.get("requested_bytes") or r["bytes"]), b / w)
            for r in mine
            if (b := _finite(r.get("baseline_wire_bytes"))) and (w := _finite(r.get("wire_bytes")))
        ]
        if shaped and ideal:
            xs, ys = _median_by_x(ideal)
            ax.plot(xs, ys, color=colors[lab], linestyle=":", linewidth=1.5)
            drawn += ys
            any_ideal = True
    ax.axhline(1.0, color="0.35", linestyle="--", linewidth=1, label="stock (1.0)")
    if shaped and any_ideal:
        _ideal_legend(ax)
    _log2_x(ax, all_x, size_text)
    _speedup_ylim(ax, drawn)
    ax.set_xlabel("message size per rank", fontsize=9)
    ax.set_ylabel("speedup (stock / compressed)", fontsize=9)
    ax.set_title(title, fontsize=9)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)


def _e2e_speedup(r: Mapping[str, Any]) -> float | None:
    s = _finite(r.get("speedup"))
    if s is not None:
        return s
    base, ttft = _finite(r.get("baseline_ttft_ms")), _finite(r.get("ttft_ms"))
    return base / ttft if base is not None and ttft else None


def _e2e_name(spec: str) -> str:
    """The legend entry of a spec: the uncompressed one is marked ``(stock)``."""
    return f"{spec} (stock)" if spec == E2E_BASELINE_SPEC else spec


def plot_e2e(records: Sequence[Mapping[str, Any]], path: str) -> str:
    """``e2e_ttft.png``: TTFT (and speedup) vs prompt length; see the module docstring. Returns ``path``."""
    records = [r for r in records if _usable(r, E2E_KEYS)]
    if not records:
        raise PlotError(f"no e2e records with keys {', '.join(E2E_KEYS)} to plot")
    groups = list(dict.fromkeys((r.get("link"), r.get("world_size")) for r in records))
    labels = list(dict.fromkeys(str(r["spec"]) for r in records))
    colors = _colors([lab for lab in labels if lab != E2E_BASELINE_SPEC])
    with_speedup = any(_e2e_speedup(r) is not None for r in records if r["spec"] != E2E_BASELINE_SPEC)
    ncols, nrows = len(groups), 2 if with_speedup else 1
    fig, axes = _new_figure(ncols, nrows, _e2e_title(records))
    for col, (lk, n) in enumerate(groups):
        recs = [r for r in records if (r.get("link"), r.get("world_size")) == (lk, n)]
        info = next((r.get("link_info") for r in recs if isinstance(r.get("link_info"), dict)), None)
        head = f"world size {n if n is not None else '?'}, {_link_text(lk, info)}"
        all_x = _e2e_ttft_panel(axes[0][col], recs, labels, colors, head)
        if with_speedup:
            _e2e_speedup_panel(axes[1][col], recs, labels, colors, all_x, _shaped(recs, lk), f"TTFT speedup, {head}")
    return _save(fig, path)


def _e2e_title(records: Sequence[Mapping[str, Any]]) -> str:
    """The e2e figure's title: the model (when there is one), what is drawn, the world sizes and the links."""
    groups = list(dict.fromkeys((r.get("link"), r.get("world_size")) for r in records))
    worlds = sorted({str(n) for _, n in groups if n is not None}) or ["?"]
    links = list(dict.fromkeys(_link_text(lk) for lk, _ in groups))
    models = sorted({str(r["model"]) for r in records if r.get("model")})
    return (
        f"End to end{f' ({models[0]})' if len(models) == 1 else ''}: time to first token vs prompt length (median "
        "and IQR over the repetitions; dotted: ideal speedup, shaped links); "
        f"world size {', '.join(worlds)}; {', '.join(links)}"
    )


def _e2e_ttft_panel(
    ax: Any, recs: Sequence[Mapping[str, Any]], labels: Sequence[str], colors: Mapping[str, Any], title: str
) -> list[float]:
    """The TTFT panel of one (link, world size): a line per spec with IQR bars, the baseline black dashed (from the
    records' ``baseline_ttft_ms`` when no ``none`` record is there). Returns the prompt lengths drawn."""
    all_x: list[float] = []
    for lab in labels:
        pts = [
            (float(r["prompt_len"]), float(r["ttft_ms"]), _iqr([float(v) for v in r.get("ttft_times_ms") or []]))
            for r in recs
            if str(r["spec"]) == lab
        ]
        if pts:
            all_x += [p[0] for p in pts]
            if lab == E2E_BASELINE_SPEC:
                _draw(ax, pts, marker="s", linestyle="--", color="black", label=_e2e_name(lab))
            else:
                _draw(ax, pts, marker="o", color=colors[lab], label=_e2e_name(lab))
    base = [(float(r["prompt_len"]), b) for r in recs if (b := _finite(r.get("baseline_ttft_ms"))) is not None]
    if base and not any(r["spec"] == E2E_BASELINE_SPEC for r in recs):
        xs, ys = _median_by_x(base)
        ax.plot(xs, ys, marker="s", color="black", linestyle="--", label="stock (baseline_ttft_ms)")
    _log2_x(ax, all_x, lambda v: f"{v:.0f}")
    ax.set_ylim(bottom=0)
    ax.set_xlabel("prompt length (tokens)", fontsize=9)
    ax.set_ylabel("TTFT (ms)", fontsize=9)
    ax.set_title(title, fontsize=9)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)
    return all_x


def _e2e_speedup_points(
    recs: Sequence[Mapping[str, Any]], base_times: Mapping[Any, Any]
) -> list[tuple[float, float, tuple[float, float] | None]]:
    """(prompt length, TTFT speedup, IQR of the per-repetition speedups) of the records that have a speedup;
    ``base_times``: the baseline's ``ttft_times_ms`` per prompt length, paired repetition by repetition."""
    return [
        (
            float(r["prompt_len"]),
            float(s),
            _ratio_spread(base_times.get(r["prompt_len"]), r.get("ttft_times_ms"), _finite(r.get("baseline_ttft_ms"))),
        )
        for r in recs
        if (s := _e2e_speedup(r)) is not None
    ]


def _e2e_speedup_panel(
    ax: Any,
    recs: Sequence[Mapping[str, Any]],
    labels: Sequence[str],
    colors: Mapping[str, Any],
    all_x: Sequence[float],
    shaped: bool,
    title: str,
) -> None:
    """The TTFT speedup panel of one (link, world size): a line per compressed spec with IQR bars, its
    ``ideal_speedup`` (dotted) on a shaped link, and the stock line at 1.0."""
    # The baseline's repetitions per prompt length: the spread of each spec's speedup pairs with them.
    base_times = {r["prompt_len"]: r.get("ttft_times_ms") for r in recs if str(r["spec"]) == E2E_BASELINE_SPEC}
    drawn: list[float] = []
    any_ideal = False
    for lab in labels:
        if lab == E2E_BASELINE_SPEC:
            continue  # the dashed line at 1.0
        mine = [r for r in recs if str(r["spec"]) == lab and _e2e_speedup(r) is not None]
        pts = _e2e_speedup_points(mine, base_times)
        if pts:
            drawn += _draw(ax, pts, marker="o", color=colors[lab], label=lab)
        # ideal_speedup: the TTFT if the codec were free and the measured communication time scaled with the
        # bytes sent; meaningful where the link is the cost (shaped).
        ideal = [(float(r["prompt_len"]), v) for r in mine if (v := _finite(r.get("ideal_speedup"))) is not None]
        if shaped and ideal:
            xs, ys = _median_by_x(ideal)
            ax.plot(xs, ys, color=colors[lab], linestyle=":", linewidth=1.5)
            drawn += ys
            any_ideal = True
    ax.axhline(1.0, color="0.35", linestyle="--", linewidth=1, label="stock (1.0)")
    if any_ideal:
        ax.plot([], [], color="0.35", linestyle=":", linewidth=1.5, label="ideal: comm. time x bytes ratio")
    _log2_x(ax, all_x, lambda v: f"{v:.0f}")
    _speedup_ylim(ax, drawn)
    ax.set_xlabel("prompt length (tokens)", fontsize=9)
    ax.set_ylabel("TTFT speedup (stock / compressed)", fontsize=9)
    ax.set_title(title, fontsize=9)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)


def plot(
    collectives: str | os.PathLike | Sequence[str | os.PathLike] | None = None,
    e2e: str | os.PathLike | None = None,
    out_dir: str | os.PathLike = DEFAULT_OUT_DIR,
) -> list[str]:
    """Read the given benchmark files (all of them first: a bad one writes nothing), draw, and return the paths
    of the PNGs written in ``out_dir`` (created if missing). ``collectives`` may be several files (e.g. one run
    per world size): their records are drawn together.

    Raises:
        PlotError: neither file given, an unusable file, or matplotlib missing.
    """
    if collectives is None and e2e is None:
        raise PlotError("nothing to plot: give --collectives FILE and/or --e2e FILE")
    coll = e2e_recs = None
    if collectives is not None:
        files = [collectives] if isinstance(collectives, str | os.PathLike) else list(collectives)
        coll = [r for f in files for r in load_records(f, "collectives", COLLECTIVES_KEYS, "tpcomp bench collectives")]
    if e2e is not None:
        e2e_recs = load_records(e2e, "e2e", E2E_KEYS, "tpcomp bench e2e")
    _matplotlib()  # fail before creating the output folder
    os.makedirs(out_dir, exist_ok=True)
    written = []
    if coll is not None:
        written.append(plot_collectives(coll, os.path.join(out_dir, COLLECTIVES_PNG)))
    if e2e_recs is not None:
        written.append(plot_e2e(e2e_recs, os.path.join(out_dir, E2E_PNG)))
    return written


def main(argv: list[str] | None = None) -> int:
    """``tpcomp bench plot``: PNGs from the benchmark JSON; prints the files written. Exit 2 on unusable input."""
    parser = argparse.ArgumentParser(
        prog="tpcomp bench plot",
        description="PNG plots of the benchmark JSON: collectives speedup vs message size (--collectives, from "
        "`tpcomp bench collectives --json`) and time to first token vs prompt length (--e2e, from "
        "`tpcomp bench e2e --json`).",
    )
    parser.add_argument(
        "--collectives", metavar="FILE", nargs="+", help=f"collectives records (one or more files) -> {COLLECTIVES_PNG}"
    )
    parser.add_argument("--e2e", metavar="FILE", help=f"end-to-end records -> {E2E_PNG}")
    parser.add_argument("--out-dir", default=DEFAULT_OUT_DIR, help=f"output folder (default {DEFAULT_OUT_DIR})")
    args = parser.parse_args(argv)
    if args.collectives is None and args.e2e is None:
        parser.error("give --collectives FILE and/or --e2e FILE")
    from megatron_tpcomp.cliutil import OutputPathError, check_output_dir

    try:
        check_output_dir(args.out_dir, "--out-dir")  # before reading and plotting
    except OutputPathError as exc:
        parser.error(str(exc))
    try:
        written = plot(args.collectives, args.e2e, args.out_dir)
    except PlotError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for path in written:
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
