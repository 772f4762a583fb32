"""``tpcomp bench perf-table``: fit the cost model's performance table to benchmark outputs, and report how well
the model predicts the measured collectives.

    tpcomp bench codecs --sizes 16KiB,1MiB,8MiB --json codecs.json
    tpcomp bench collectives --link 1gbit --sizes 64KiB,1MiB,8MiB --json coll.json
    tpcomp bench perf-table --codecs codecs.json --collectives coll.json --link 1gbit --out perf.json

The table feeds policy ``auto`` (``"perf_table": "perf.json"`` in a compression config). Link parameters are fitted
to the stock all-reduce timings of one link setting (``--link``); codec parameters to the codec benchmark.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from megatron_tpcomp.costmodel import CostModel, fit, payload_bytes


def prediction_errors(model: CostModel, records: list[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Per record: predicted vs measured milliseconds of the stock and the compressed path, relative errors."""
    out = []
    for r in records:
        if r.get("fallback") or int(r["world_size"]) < 2:
            continue
        n, b = int(r["world_size"]), int(r["bytes"])
        algo = r.get("algo_used") or r.get("algo") or "one-shot"
        stock = 1e3 * model.stock(r["op"], b, n)
        chunks = int(r.get("chunks") or 1)
        comp = 1e3 * model.compressed(r["op"], b, n, r.get("canonical", r["spec"]), payload_bytes(r), algo, chunks)
        out.append(
            {
                "op": r["op"],
                "spec": r["spec"],
                "algo": algo,
                "world_size": n,
                "bytes": b,
                "stock_ms": r["baseline_median_ms"],
                "stock_pred_ms": stock,
                "stock_err": stock / r["baseline_median_ms"] - 1,
                "comp_ms": r["median_ms"],
                "comp_pred_ms": comp,
                "comp_err": comp / r["median_ms"] - 1,
            }
        )
    return out


def _load_records(path: str) -> list[dict[str, Any]]:
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"cannot read benchmark records {path}: {exc}") from None
    records = data.get("records", data) if isinstance(data, dict) else data
    if not isinstance(records, list) or not all(isinstance(r, dict) for r in records):
        raise ValueError(f"{path}: expected a JSON list of benchmark records")
    return records


def main(argv: list[str] | None = None) -> int:
    from megatron_tpcomp.cliutil import HelpFormatter

    p = argparse.ArgumentParser(
        prog="tpcomp bench perf-table", description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter
    )
    p.add_argument("--codecs", required=True, help="JSON of `tpcomp bench codecs` (two or more sizes per spec)")
    p.add_argument("--collectives", help="JSON of `tpcomp bench collectives` (link fit and prediction errors)")
    p.add_argument("--link", help="which link setting of the collective records to fit (e.g. 1gbit, none)")
    p.add_argument("--device", default="cpu", help="device name recorded in the table (default cpu)")
    p.add_argument("--out", required=True, help="performance table to write (JSON)")
    args = p.parse_args(argv)
    from megatron_tpcomp.cliutil import atomic_write_json, check_output_file

    try:
        check_output_file(args.out, "--out")
        codec_records = _load_records(args.codecs)
        coll = _load_records(args.collectives) if args.collectives else []
        links = sorted({str(r.get("link")) for r in coll})
        if len(links) > 1 and args.link is None:
            raise ValueError(f"the collective records cover links {links}; choose one with --link")
        if args.link is not None:
            coll = [r for r in coll if str(r.get("link")) == args.link]
            if not coll:
                raise ValueError(f"no collective records for --link {args.link}; present: {links}")
        dtypes = {r.get("dtype", "bfloat16") for r in codec_records}
        model = fit(codec_records, coll, device=args.device, dtype=sorted(dtypes)[0] if dtypes else "bfloat16")
    except (ValueError, KeyError) as exc:
        print(f"tpcomp bench perf-table: error: {exc}", file=sys.stderr)
        return 2
    atomic_write_json(args.out, model.to_json())
    for n, link in sorted(model.links.items()):
        gbit = link.beta_bytes_per_s * 8 / 1e9
        print(f"link N={n}: {link.alpha_s * 1e6:.1f} us per step, {gbit:.3f} Gbit/s ({link.source})")
    for spec, c in sorted(model.codecs.items()):
        print(
            f"codec {spec}: encode {c.enc_lat_s * 1e6:.0f} us + {c.enc_bw / 1e9:.3f} GB/s, decode "
            f"{c.dec_lat_s * 1e6:.0f} us + {c.dec_bw / 1e9:.3f} GB/s ({c.source})"
        )
    for key, o in sorted(model.overheads.items()):
        print(f"path {key}: measured overhead {o * 1e6:+.0f} us per call (beyond the formula)")
    errors = prediction_errors(model, coll)
    for e in errors:
        print(
            f"{e['op']} {e['spec']} {e['algo']} N={e['world_size']} {e['bytes']} B: stock {e['stock_ms']:.2f} ms "
            f"(predicted {e['stock_pred_ms']:.2f}, {100 * e['stock_err']:+.0f}%), compressed {e['comp_ms']:.2f} ms "
            f"(predicted {e['comp_pred_ms']:.2f}, {100 * e['comp_err']:+.0f}%)"
        )
    if errors:
        med = statistics.median(abs(e["comp_err"]) for e in errors)
        print(f"median |error| of the compressed-path prediction: {100 * med:.0f}% over {len(errors)} cases")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
