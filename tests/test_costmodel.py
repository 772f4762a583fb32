"""Cost model: fits recover known parameters; choices follow the link and the message size."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from megatron_tpcomp.costmodel import CostModel, Link, fit, fit_codecs, fit_links

MiB = 1 << 20


def test_codec_fit_recovers_latency_and_throughput() -> None:
    lat, bw = 40e-6, 0.3e9  # like the torch reference INT4 encoder on 2 CPU cores
    records = [
        {"canonical": "int4:g32:sfp16", "bytes": b, "encode_ms": (lat + b / bw) * 1e3, "decode_ms": (b / 1.2e9) * 1e3}
        for b in (16 * 1024, MiB, 8 * MiB)
    ]
    speed = fit_codecs(records)["int4:g32:sfp16"]
    assert speed.enc_lat_s == pytest.approx(lat, rel=1e-6) and speed.enc_bw == pytest.approx(bw, rel=1e-6)
    assert speed.dec_lat_s == pytest.approx(0.0, abs=1e-12) and speed.dec_bw == pytest.approx(1.2e9, rel=1e-6)


def test_link_fit_recovers_the_ring_parameters() -> None:
    alpha, beta, n = 50e-6, 125e6, 3  # 1 Gbit/s
    records = [
        {"op": "all_reduce", "world_size": n, "bytes": b, "baseline_median_ms": 1e3 * model_time(alpha, beta, n, b)}
        for b in (16 * 1024, MiB, 8 * MiB)
    ]
    link = fit_links(records)[n]
    assert link.alpha_s == pytest.approx(alpha, rel=1e-6) and link.beta_bytes_per_s == pytest.approx(beta, rel=1e-6)


def model_time(alpha: float, beta: float, n: int, b: int) -> float:
    return 2 * (n - 1) * alpha + 2 * (n - 1) / n * b / beta


def test_choices_follow_link_speed_and_message_size() -> None:
    model = CostModel.default()
    model.links[2] = Link(50e-6, 125e6)  # 1 Gbit/s, 50 us per step
    payload = lambda b: int(b * 4.5 / 16)  # noqa: E731  int4 g32 of bf16
    big, small = 8 * MiB, 4 * 1024
    spec, algo, _ = model.choose("all_reduce", big, 2, [("int4", payload(big))])
    assert (spec, algo) == ("int4", "one-shot")
    # A decode-sized message on the same link: latency-bound, the codec's fixed cost is not repaid.
    slow_codec = fit_codecs(
        [{"canonical": "int4", "bytes": b, "encode_ms": 0.2 + b / 3e5, "decode_ms": 0.2 + b / 1e6} for b in (1024, MiB)]
    )
    model.codecs.update(slow_codec)
    assert model.choose("all_reduce", small, 2, [("int4", payload(small))])[0] == "none"
    # NVLink-class link: never worth it with a CPU-speed codec.
    model.links[2] = Link(5e-6, 300e9)
    assert model.choose("all_reduce", big, 2, [("int4", payload(big))])[0] == "none"


def test_two_shot_is_chosen_only_where_it_sends_fewer_bytes() -> None:
    model = CostModel.default()
    model.links[8] = Link(10e-6, 1e9)
    b = 64 * MiB
    spec, algo, _ = model.choose("all_reduce", b, 8, [("int4", b // 4)], algos=("one-shot", "two-shot"))
    assert (spec, algo) == ("int4", "two-shot")  # 7 P vs 1.75 P on the wire


def test_table_round_trip_and_errors(tmp_path: Path) -> None:
    model = fit([], [], device="cpu-test")
    path = tmp_path / "perf.json"
    path.write_text(json.dumps(model.to_json()))
    again = CostModel.load(path)
    assert again.to_json() == model.to_json()
    assert CostModel.load(None).link(2).source.startswith("default")  # no table: the published defaults
    bad = model.to_json()
    bad["links"]["0"]["beta_bytes_per_s"] = 0
    path.write_text(json.dumps(bad))
    with pytest.raises(ValueError, match="bandwidths must be > 0"):
        CostModel.load(path)
    path.write_text("{")
    with pytest.raises(ValueError, match="cannot read performance table"):
        CostModel.load(path)
    with pytest.raises(ValueError, match="unknown op"):
        model.stock("broadcast", 10, 2)


def test_pipelined_one_shot_hides_the_codec_behind_the_link() -> None:
    from megatron_tpcomp.costmodel import CodecSpeed

    # 2 ranks at 1 Gbit/s (125 MB/s), an 8 MiB message, a 2.36 MB payload, a codec at 1 GB/s each way.
    link = Link(50e-6, 125e6)
    model = CostModel(links={2: link}, codecs={"*": CodecSpeed(0.0, 1e9, 0.0, 1e9)})
    b, p, n = 8 * MiB, 2_359_104, 2
    serial = model.compressed("all_reduce", b, n, "int4:g32", p)
    assert serial == pytest.approx(b / 1e9 + link.step(p) + 2 * b / 1e9)
    k = 8  # per chunk: encode 1.05 ms, decode 2 x 1.05 ms, wire 2.41 ms -> the codec (3.15 ms) sets the period
    e, d, w = b / k / 1e9, 2 * b / k / 1e9, link.step(p / k)
    piped = model.compressed("all_reduce", b, n, "int4:g32", p, chunks=k)
    assert piped == pytest.approx(e + (k - 1) * max(e + d, w) + w + d)
    assert piped < serial
    # choose() passes the chunk count through: at this speed the pipelined path beats the stock ring (134 ms).
    spec, algo, t = model.choose("all_reduce", b, n, [("int4:g32", p)], chunks=k)
    assert (spec, algo) == ("int4:g32", "one-shot") and t == pytest.approx(piped)


def test_path_overheads_are_fitted_and_keep_tiny_messages_stock() -> None:
    from megatron_tpcomp.costmodel import fit_overheads, path_key

    alpha, beta, n = 200e-6, 125e6, 3  # 1 Gbit/s with a CPU-like per-step latency
    codecs = [
        {"canonical": "int4", "bytes": b, "encode_ms": 0.02 + b / 1e6, "decode_ms": 0.02 + b / 2e6}
        for b in (16 * 1024, MiB, 8 * MiB)
    ]
    stock = [
        {"op": "all_reduce", "world_size": n, "bytes": b, "baseline_median_ms": 1e3 * model_time(alpha, beta, n, b)}
        for b in (16 * 1024, MiB, 8 * MiB)
    ]
    base = fit(codecs, stock)
    assert base.overheads == {}  # no compressed timings: nothing assumed
    # Compressed timings: the formula plus 1.5 ms per call (several library calls of a CPU process group).
    extra = 1.5e-3
    comp = []
    for b in (2304, 16 * 1024, MiB):
        payload = b * 9 // 32
        t = base.path_formula("all_reduce", b, n, "int4", payload, "one-shot") + extra
        wire = (n - 1) * payload
        comp.append(
            {
                "op": "all_reduce",
                "world_size": n,
                "bytes": b,
                "baseline_median_ms": 1e3 * model_time(alpha, beta, n, b),  # real records time both paths
                "canonical": "int4",
                "algo_used": "one-shot",
                "median_ms": t * 1e3,
                "wire_bytes": wire,
            }
        )
    comp.append({**comp[0], "canonical": "fp8"})  # a codec the table has no speed for: skipped
    assert fit_overheads(base, comp) == {path_key("all_reduce", "one-shot", n): pytest.approx(extra, rel=1e-6)}
    model = fit(codecs, stock + comp)
    assert model.overheads == {"all_reduce/one-shot/3": pytest.approx(extra, rel=1e-6)}
    tiny, big = 2304, 8 * MiB  # a one-token fp32 decode message of hidden 576; a prefill message
    assert base.choose("all_reduce", tiny, n, [("int4", tiny * 9 // 32)])[0] == "int4"  # formula alone: 2 vs 4 steps
    assert model.choose("all_reduce", tiny, n, [("int4", tiny * 9 // 32)])[0] == "none"
    assert model.choose("all_reduce", big, n, [("int4", big * 9 // 32)])[0] == "int4"
    again = CostModel.from_json(json.loads(json.dumps(model.to_json())))
    assert again.overheads == model.overheads
    bad = model.to_json()
    bad["overheads"]["all_reduce/one-shot/3"] = float("nan")
    with pytest.raises(ValueError, match="overheads must be finite"):
        CostModel.from_json(bad)


def test_formulas_come_from_the_algorithm_descriptors(monkeypatch: pytest.MonkeyPatch) -> None:
    import dataclasses
    from fractions import Fraction

    from megatron_tpcomp.collectives import algorithms
    from megatron_tpcomp.costmodel import CodecSpeed

    alpha, beta, n, b, p = 1e-4, 1e8, 3, 3 * MiB, MiB
    model = CostModel(links={n: Link(alpha, beta)}, codecs={"*": CodecSpeed(1e-5, 1e9, 2e-5, 2e9)})
    c = model.codec("*")
    for a in algorithms.ALGORITHMS:  # each path: its codec calls + rounds * alpha + its bytes / beta
        codec = sum(t.calls * (c.enc if t.kind == "enc" else c.dec)(b * t.share) for t in a.codec_work(n))
        wire = a.rounds(n) * alpha + float(a.wire_fraction(n)) * (p if a.compressed else b) / beta
        got = model.stock(a.op, b, n) if not a.compressed else model.path_formula(a.op, b, n, "x", p, a.name)
        assert got == pytest.approx(codec + wire, rel=1e-9), (a.op, a.name)
    # A changed descriptor changes the prediction: two-shot with three steps per peer, the ring with whole copies.
    two_shot, ring = model.path_formula("all_reduce", b, n, "x", p, "two-shot"), model.stock("all_reduce", b, n)
    slower = dataclasses.replace(algorithms.TWO_SHOT, steps_per_peer=3)
    fat_ring = dataclasses.replace(algorithms.STOCK_ALL_REDUCE, step_share=lambda n: Fraction(1))
    swap = {algorithms.TWO_SHOT: slower, algorithms.STOCK_ALL_REDUCE: fat_ring}
    monkeypatch.setattr(algorithms, "ALGORITHMS", tuple(swap.get(a, a) for a in algorithms.ALGORITHMS))
    got = model.path_formula("all_reduce", b, n, "x", p, "two-shot")
    assert got == pytest.approx(two_shot + 2 * alpha + (2 - Fraction(4, 3)) * p / beta, rel=1e-9)
    assert model.stock("all_reduce", b, n) == pytest.approx(ring + (4 - Fraction(4, 3)) * b / beta, rel=1e-9)


def test_path_keys_use_the_collectives_algorithm_names() -> None:
    from megatron_tpcomp.costmodel import path_key

    assert path_key("all_reduce", "two-shot", 3) == "all_reduce/two-shot/3"
    assert path_key("reduce_scatter", "all-to-all", 3) == "reduce_scatter/all-to-all/3"  # as CommStats.algo
    assert path_key("all_gather", "one-shot", 2) == "all_gather/all-gather/2"  # the config's setting: its one algo
    table = CostModel.default().to_json()
    table["overheads"] = {"reduce_scatter/one-shot/3": 1e-3}  # an older table's key
    assert CostModel.from_json(table).overheads == {"reduce_scatter/all-to-all/3": 1e-3}
