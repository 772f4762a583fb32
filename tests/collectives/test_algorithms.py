"""Algorithm descriptors: their bytes equal what the collectives send (real gloo groups of 2 and 3 ranks), their
names are the ones ``CommStats`` reports, and the ``auto`` rule."""

from __future__ import annotations

import pytest
import torch

from megatron_tpcomp.codecs import make_codec
from megatron_tpcomp.collectives import algorithms, all_gather, all_reduce, chunking, reduce_scatter
from megatron_tpcomp.collectives.algorithms import ALGORITHMS, STOCK, algorithm, choose_algo, wire_factor
from megatron_tpcomp.launch import run_distributed

SPEC = "int4:g32+had"
SHAPE = (24, 2, 576)  # s divides by 2 and 3 for the reduce-scatter


def _calls(rank: int, world_size: int) -> dict:
    """CommStats of one call per algorithm (keyed ``op/name``, plus the pipelined one-shot), and the dim used."""
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(rank)).to(torch.bfloat16)
    out = {}
    for a in ALGORITHMS:
        stats: list = []
        spec = SPEC if a.compressed else "none"
        if a.op == "all_reduce":
            all_reduce(x, spec, algo="one-shot" if a.name == "stock" else a.name, stats=stats)
        elif a.op == "all_gather":
            all_gather(x, spec, dim=-1, stats=stats)
        else:
            reduce_scatter(x, spec, dim=0, stats=stats)
        out[f"{a.op}/{a.name}"] = stats[0]
    saved = chunking.PIPELINE_MIN_BYTES, chunking.PIPELINE_CHUNK_BYTES
    try:
        chunking.PIPELINE_MIN_BYTES, chunking.PIPELINE_CHUNK_BYTES = 1 << 12, 1 << 12
        stats = []
        all_reduce(x, SPEC, algo="one-shot", stats=stats)
        out["all_reduce/one-shot/pipelined"] = stats[0]
    finally:
        chunking.PIPELINE_MIN_BYTES, chunking.PIPELINE_CHUNK_BYTES = saved
    return out


@pytest.mark.timeout(120)
@pytest.mark.parametrize("n", [2, 3])
def test_descriptors_send_what_the_collectives_send(n: int) -> None:
    results = run_distributed(_calls, n, timeout_s=90)
    codec = make_codec(SPEC)
    nbytes = 2 * torch.Size(SHAPE).numel()
    for key, st in results[0].items():
        op, name = key.split("/")[:2]
        a = algorithm(op, name)
        assert (st.op, st.algo) == (a.op, a.name), key  # CommStats names the descriptor
        assert st.baseline_wire_bytes == STOCK[op].wire_bytes(nbytes, n), key
        if not a.compressed:
            assert st.wire_bytes == a.wire_bytes(nbytes, n) and st.fallback == "codec is 'none'", key
            continue
        dim = 0 if op == "reduce_scatter" else len(SHAPE) - 1
        plan = a.plan(SHAPE, codec, n, dim, st.chunks)
        assert st.wire_bytes == a.wire_bytes(plan.payload_nbytes(codec), n), key
        # Pipelined chunks are rounded up to whole codec super-blocks: at most the planned count.
        assert 1 <= len(plan.pieces) <= (n if name in ("two-shot", "all-to-all") else st.chunks), key
    assert results[0]["all_reduce/one-shot/pipelined"].chunks > 1
    assert all(r == results[0] for r in results[1:])  # every rank sends the same bytes


def test_the_table_of_bytes_rounds_and_quantizations() -> None:
    n, p = 4, 1000
    table = {(a.op, a.name): (a.wire_bytes(p, n), a.rounds(n), a.quantizations) for a in ALGORITHMS}
    assert table == {
        ("all_reduce", "stock"): (1500, 6, 0),
        ("all_reduce", "one-shot"): (3000, 3, 1),
        ("all_reduce", "two-shot"): (1500, 6, 2),
        ("all_gather", "stock"): (3000, 3, 0),
        ("all_gather", "all-gather"): (3000, 3, 1),
        ("reduce_scatter", "stock"): (750, 3, 0),
        ("reduce_scatter", "all-to-all"): (750, 3, 1),
    }
    assert [a.pipelined for a in ALGORITHMS].count(True) == 1 and algorithm("all_reduce", "one-shot").pipelined


def test_lookup_names_and_errors() -> None:
    assert algorithm("reduce_scatter", "one-shot").name == "all-to-all"  # the config's all-reduce setting
    assert algorithm("all_gather", "auto").name == "all-gather"
    with pytest.raises(ValueError, match="unknown all_reduce algorithm 'three-shot'"):
        algorithm("all_reduce", "three-shot")
    with pytest.raises(ValueError, match="unknown op 'broadcast'"):
        algorithm("broadcast", "stock")


@pytest.mark.parametrize(
    ("n", "nbytes", "algo"),
    [(2, 1 << 30, "one-shot"), (3, 1 << 30, "one-shot"), (4, 1 << 10, "one-shot"), (4, 1 << 20, "two-shot")],
)
def test_auto_size_rule(n: int, nbytes: int, algo: str) -> None:
    assert choose_algo(n, nbytes) == algo


def test_auto_cost_rule_picks_the_fastest_first_on_a_tie() -> None:
    assert choose_algo(2, 1 << 30, {"one-shot": 2.0, "two-shot": 1.0}.__getitem__) == "two-shot"
    assert choose_algo(8, 1 << 30, {"one-shot": 1.0, "two-shot": 1.0}.__getitem__) == "one-shot"
    assert choose_algo(8, 1 << 30, {"one-shot": 1.0}.__getitem__, ("one-shot",)) == "one-shot"


@pytest.mark.parametrize("n", [1, 2, 3, 4, 8])
def test_wire_factor_in_units_of_the_ring_all_reduce(n: int) -> None:
    assert wire_factor("one-shot", n) == n / 2 and wire_factor("two-shot", n) == 1.0
    with pytest.raises(ValueError, match="unknown algo 'auto'"):
        wire_factor("auto", n)


def test_algos_setting_values() -> None:
    assert algorithms.ALGOS == ("auto", "one-shot", "two-shot")  # config and CLI values


def test_every_algorithm_module_is_listed_and_the_tables_follow_the_list() -> None:
    # Adding an algorithm is a module that builds its descriptor plus its entry in ALGORITHMS: a descriptor
    # defined in any collectives module but missing from the list would run nowhere and be costed nowhere.
    import importlib
    import pkgutil

    import megatron_tpcomp.collectives as package
    from megatron_tpcomp.collectives.descriptor import Algorithm

    defined = set()
    for info in pkgutil.iter_modules(package.__path__):
        module = importlib.import_module(f"{package.__name__}.{info.name}")
        defined |= {v for v in vars(module).values() if isinstance(v, Algorithm)}
    assert defined == set(ALGORITHMS)
    assert algorithms.ALL_REDUCE_ALGOS == tuple(a.name for a in ALGORITHMS if a.op == "all_reduce" and a.compressed)
    assert algorithms.ALGOS == ("auto", *algorithms.ALL_REDUCE_ALGOS)
    assert {op: a.name for op, a in STOCK.items()} == dict.fromkeys(algorithms.OPS, "stock")
    assert len({(a.op, a.name) for a in ALGORITHMS}) == len(ALGORITHMS)  # one descriptor per (op, name)
