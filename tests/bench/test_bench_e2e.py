"""``tpcomp bench e2e`` on the real SmolLM2-135M at TP=3 (3 rank processes, shaped when root), its aggregation and
targets, and its argument errors.

Prompts are short and repetitions single: these tests check the records, not the speed (targets live in the
benchmark).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from megatron_tpcomp.bench import e2e as bench
from megatron_tpcomp.bench import link as linkmod
from megatron_tpcomp.bench.e2e_worker import CommClock, exact_prompt, stock_wire_bytes

NO_LINK = linkmod.unavailable_reason()
LENS = (32, 64)
SPECS = ("none", "int4:g32")


def _check_records(records: list[dict], link: str, lens: tuple[int, ...], specs: tuple[str, ...]) -> None:
    assert [(r["prompt_len"], r["spec"]) for r in records] == [(L, s) for L in lens for s in specs]
    for rec in records:
        for key in bench.REQUIRED_KEYS:
            assert key in rec, key
        assert rec["link"] == link and rec["world_size"] == 3 and rec["reps"] == 1
        assert rec["prompt_tokens"] == rec["prompt_len"]  # the engine saw exactly prompt_len tokens
        assert rec["gen_tokens"] == 2 and rec["dtype"] == "fp32"
        assert rec["ttft_ms"] > 0 and rec["tpot_ms"] > 0 and rec["baseline_ttft_ms"] > 0 and rec["baseline_tpot_ms"] > 0
        assert rec["speedup"] == pytest.approx(rec["baseline_ttft_ms"] / rec["ttft_ms"])
        assert rec["tpot_speedup"] == pytest.approx(rec["baseline_tpot_ms"] / rec["tpot_ms"])
        assert 0 < rec["comm_share"] < 1 and 0 < rec["decode_comm_share"] < 1
        assert rec["wire_bytes"] > 0
        json.dumps(rec)  # serialisable as is
    by = {(r["prompt_len"], r["spec"]): r for r in records}
    for L in lens:
        base, comp = by[(L, "none")], by[(L, "int4:g32")]
        assert base["speedup"] == 1.0 and base["tpot_speedup"] == 1.0
        assert base["prefill_compressed_frac"] == 0.0
        assert comp["comm_share"] == base["comm_share"]  # the baseline's share on every record
        # 61 collectives per prefill (embedding, 2 per layer x 30, logits); int4 compresses the 60 layer ones.
        assert comp["prefill_compressed_frac"] == pytest.approx(60 / 62, abs=0.02)
        # fp32 ring all-reduce 4/3 B vs int4:g32 one-shot/two-shot at ~4.5 bits: far fewer bytes.
        assert comp["wire_bytes"] < base["wire_bytes"] / 3
    if len(lens) > 1:
        assert by[(lens[1], "none")]["wire_bytes"] > by[(lens[0], "none")]["wire_bytes"]


@pytest.mark.slow
@pytest.mark.megatron
def test_main_unshaped_end_to_end(real_ckpt: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "e2e.json"
    argv = ["--link", "none", "--prompt-lens", ",".join(map(str, LENS)), "--gen-tokens", "2", "--reps", "1"]
    specs = (*SPECS, "auto")
    argv += ["--warmup", "1", "--specs", ",".join(specs), "--model", str(real_ckpt), "--json", str(out)]
    assert bench.main(argv) == 0
    records = json.loads(out.read_text())
    _check_records(records, "none", LENS, specs)
    for rec in records:
        assert not rec["shaped"] and rec["link_info"]["mode"] == "loopback"
    # auto's table was fitted on this link, with the measured per-call overheads of both compressed paths.
    table = next(r["perf_table"] for r in records if r["spec"] == "auto")
    assert set(table["overheads"]) == {"all_reduce/one-shot/3", "all_reduce/two-shot/3"}
    assert table["links"]["3"]["source"] == "measured"
    text = capsys.readouterr().out
    assert "int4:g32" in text and "TTFT ms" in text and f"wrote {len(records)} records" in text


@pytest.mark.slow
@pytest.mark.megatron
@pytest.mark.skipif(NO_LINK is not None, reason=f"shaped link unavailable: {NO_LINK}")
def test_run_shaped_end_to_end(real_ckpt: Path) -> None:
    logs: list[str] = []
    records = bench.run(
        ["1gbit"], [32], SPECS, gen_tokens=2, reps=1, warmup=0, model=str(real_ckpt), timeout_s=240, log=logs.append
    )
    _check_records(records, "1gbit", (32,), SPECS)
    for rec in records:
        info = rec["link_info"]
        assert rec["shaped"] and info["rate_bps"] == 10**9 and info["mode"] == "bridge"
        assert not set(info["namespaces"]) & set(linkmod.list_namespaces())  # cleaned up
    assert any("tbf rate 1gbit" in line for line in logs)
    lines = bench.target_lines(records)
    assert len(lines) == 1 and lines[0].startswith("target int4:g32 TTFT 1gbit 32 tokens (baseline comm ")


def _fake_result(specs: tuple[str, ...] = ("none", "int4:g32", "auto"), lens: tuple[int, ...] = (128,)) -> dict:
    """What a worker returns: two repetitions; none 100/110 ms TTFT, int4 50/60, auto 103/104.9; TPOT 10, 8, 10.1."""
    ttft = {"none": (100.0, 110.0), "int4:g32": (50.0, 60.0), "auto": (103.0, 104.9)}
    tpot = {"none": 10.0, "int4:g32": 8.0, "auto": 10.1}
    runs = []
    for rep in range(2):
        for L in lens:
            for s in specs:
                runs.append(
                    dict(
                        rep=rep,
                        prompt_len=L,
                        prompt_tokens=L,
                        spec=s,
                        ttft_ms=ttft[s][rep],
                        tpot_ms=tpot[s],
                        comm_ms=40.0,
                        comm_share=0.5 if s == "none" else 0.3,
                        decode_comm_share=0.6,
                        wire_bytes=1000 if s == "none" else 200,
                        decode_wire_bytes=30,
                        prefill_calls=62,
                        prefill_compressed_calls=0 if s == "none" else 60,
                        decode_calls=62,
                        decode_compressed_calls=0,
                        decode_steps=3,
                        auto_choices={"all_reduce|layer0.mlp|none": 2} if s == "auto" else {},
                    )
                )
    return dict(runs=runs, prompts={str(L): L for L in lens}, calibration=None, perf_table=None, threads=1)


def test_aggregate_medians_ratios_and_targets() -> None:
    info = {"rate": "none", "rate_bps": None, "shaped": False, "mode": "loopback"}
    result = dict(_fake_result(), dtype="fp32", model="m")
    records = bench.aggregate(result, "none", info, 3)
    by = {r["spec"]: r for r in records}
    assert by["none"]["ttft_ms"] == 105.0 and by["none"]["speedup"] == 1.0
    assert by["int4:g32"]["ttft_ms"] == 55.0 and by["int4:g32"]["speedup"] == pytest.approx(105 / 55)
    assert by["int4:g32"]["tpot_speedup"] == pytest.approx(10 / 8) and by["int4:g32"]["comm_share"] == 0.5
    assert by["int4:g32"]["spec_comm_share"] == 0.3 and by["int4:g32"]["ttft_times_ms"] == [50.0, 60.0]
    assert by["auto"]["auto_choices"] == {"all_reduce|layer0.mlp|none": 2}
    assert by["auto"]["decode_wire_bytes_per_token"] == 10.0 and by["int4:g32"]["gen_tokens"] == 4
    assert by["int4:g32"]["ideal_speedup"] == pytest.approx(1 / (0.5 + 0.5 * 200 / 1000))
    assert by["none"]["ideal_speedup"] == 1.0
    lines = bench.target_lines(records)
    assert lines == [
        "target auto TTFT none 128 tokens: -1.0% vs none (goal <= +2%): met",
        "target auto TPOT none 128 tokens: +1.0% vs none (goal <= +2%): met",
    ]
    shaped = {"rate": "1gbit", "rate_bps": 10**9, "shaped": True, "mode": "bridge"}
    slow = bench.aggregate(result, "1gbit", shaped, 3)
    lines = bench.target_lines(slow)
    assert lines[0] == f"target int4:g32 TTFT 1gbit 128 tokens (baseline comm 50%): {105 / 55:.2f}x (goal >= 1.6x): met"
    assert lines[1:] == ["target auto TPOT 1gbit 128 tokens: +1.0% vs none (goal <= +2%): met"]  # no TTFT goal
    text = bench.format_table(records)
    assert text.count("\n") == len(records) + 1 and "1.91x" in text


def test_run_without_root_says_so_and_runs_unshaped(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(linkmod, "unavailable_reason", lambda: "not root (test)")
    monkeypatch.setattr(bench, "resolve_model", lambda model, tp: "CKPT")
    plans = []

    def fake_launch(world_size: int, link: object, plan: dict, workdir: str, timeout_s: float) -> dict:
        assert link is None and world_size == 3
        plans.append(plan)
        return dict(_fake_result(("none", "int4:g32")), dtype=plan["dtype"], model=plan["model"])

    monkeypatch.setattr(bench, "_launch", fake_launch)
    logs: list[str] = []
    records = bench.run(["1gbit", "none"], [128], ["int4:g32"], reps=2, log=logs.append)  # none added first
    assert len(plans) == 1 and plans[0]["specs"] == ["none", "int4:g32"] and plans[0]["model"] == "CKPT"
    assert [r["spec"] for r in records] == ["none", "int4:g32"]
    for rec in records:
        assert rec["link"] == "none" and not rec["shaped"]
        assert rec["link_info"]["requested"] == "1gbit" and rec["link_info"]["reason"] == "not root (test)"
    assert any("cannot shape (not root (test))" in line and "UNSHAPED" in line for line in logs)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--prompt-lens", "0"], "--prompt-lens needs positive token counts, got '0'"),
        (["--prompt-lens", "64,abc"], "'abc' is not a whole number"),
        (["--specs", "none,int9:zz"], "bad spec 'int9:zz'"),
        (["--gen-tokens", "1"], "--gen-tokens must be >= 2, got 1"),
        (["--link", "1gbps"], "bad link rate '1gbps'"),
        (["--tp", "1"], "--tp must be >= 2, got 1"),
        (["--reps", "0"], "--reps must be >= 1, got 0"),
        (["--burst", "lots"], "bad size 'lots'"),
        (["--perf-table", "no/such/table.json"], "no/such/table.json"),
        (["--dtype", "fp8"], "invalid choice: 'fp8'"),
    ],
)
def test_cli_bad_args_exit_2(argv: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        bench.main(argv)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "tpcomp bench e2e" in err and message in err, err


def test_cli_missing_model_is_an_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        bench.main(["--model", str(tmp_path / "missing")])
    assert info.value.code == 2
    assert "--model" in capsys.readouterr().err


def test_worker_helpers() -> None:
    x = torch.zeros(4, 1, 576, dtype=torch.float32)
    assert stock_wire_bytes("all_reduce", x, 3) == 2 * 2 * 4 * 576 * 4 // 3
    assert stock_wire_bytes("all_gather_last", x, 3) == 2 * 4 * 576 * 4
    assert stock_wire_bytes("reduce_scatter", x, 4) == 3 * 4 * 576 * 4 // 4
    assert stock_wire_bytes("all_reduce", None, 3) == 0
    clock = CommClock(3)
    clock.events = [(0.0, 1.0, 10, True), (1.0, 1.5, 20, False), (2.0, 2.25, 5, False)]
    pre, dec = clock.split(1.5)
    assert pre == dict(comm_s=1.5, wire_bytes=30, calls=2, compressed_calls=1)
    assert dec == dict(comm_s=0.25, wire_bytes=5, calls=1, compressed_calls=0)

    # A tokenizer whose detokenized prefixes re-tokenize differently: "ab" merges into one token.
    vocab = {"a": 0, "b": 1, "ab": 2, "c": 3}
    inv = {v: k for k, v in vocab.items()}

    def tokenize(text: str) -> list[int]:
        out, i = [], 0
        while i < len(text):
            if text[i : i + 2] == "ab":
                out.append(2)
                i += 2
            else:
                out.append(vocab[text[i]])
                i += 1
        return out

    ids = [0, 1, 3, 0, 1, 3, 3, 3]  # "a" "b" "c" ... as single letters: "abcabccc" re-tokenizes shorter
    text, n = exact_prompt(tokenize, lambda t: "".join(inv[i] for i in t), ids, 4)
    assert n == 4 and len(tokenize(text)) == 4
    assert text == "abcabc"  # 6 single letters, 4 tokens


# --- per-layer config files as settings (--config) ---

#: A per-layer config for SmolLM2-135M at TP=3 (30 layers, hidden 576): INT4 everywhere but layer 0's MLP.
MINE = {"version": 1, "default": "int4:g32", "layers": {"0": {"mlp": "int6:g128"}}}


def _write(path: Path, data: dict) -> Path:
    path.write_text(json.dumps(data))
    return path


def _last_error_line(err: str) -> str:
    line = err.strip().splitlines()[-1]
    assert line.startswith("tpcomp bench e2e: error: "), err
    return line


def test_cli_config_missing_file_is_a_one_line_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # Read before the model is resolved: a typo costs no conversion and starts no rank.
    with pytest.raises(SystemExit) as info:
        bench.main(["--config", str(tmp_path / "nope.json"), "--link", "none"])
    assert info.value.code == 2
    line = _last_error_line(capsys.readouterr().err)
    assert "nope.json" in line and "No such file" in line, line


def test_cli_config_for_another_model_is_a_one_line_error(
    real_ckpt: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    other = _write(tmp_path / "other.json", {**MINE, "model": {"num_layers": 7, "hidden_size": 576}})
    with pytest.raises(SystemExit) as info:
        bench.main(["--config", str(other), "--model", str(real_ckpt), "--link", "none"])
    assert info.value.code == 2
    line = _last_error_line(capsys.readouterr().err)
    assert f"--config {other}" in line and "num_layers=7" in line and "num_layers=30" in line, line
    # A layer index past the model's 30 layers, with no model block: caught by the check against the checkpoint.
    deep = _write(tmp_path / "deep.json", {"version": 1, "layers": {"40": {"mlp": "int4:g32"}}})
    with pytest.raises(SystemExit):
        bench.main(["--config", str(deep), "--model", str(real_ckpt), "--link", "none"])
    line = _last_error_line(capsys.readouterr().err)
    assert f"--config {deep}" in line and "40" in line, line


def test_cli_config_stems_must_be_distinct_labels(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "a").mkdir()
    one, two = _write(tmp_path / "mine.json", MINE), _write(tmp_path / "a" / "mine.json", MINE)
    with pytest.raises(SystemExit):
        bench.main(["--config", str(one), "--config", str(two), "--link", "none"])
    line = _last_error_line(capsys.readouterr().err)
    assert "a second config labelled 'mine'" in line, line


def test_run_passes_configs_to_the_ranks_after_the_specs(real_ckpt: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The plan the ranks get (the rank side of configs is run for real by tests/test_demo.py's link test).
    plans = []

    def fake_launch(world_size: int, link: object, plan: dict, workdir: str, timeout_s: float) -> dict:
        plans.append(plan)
        result = _fake_result(("none", "int4:g32", "auto"))
        for r in result["runs"]:  # the third setting plays the config
            r["spec"] = "mine" if r["spec"] == "auto" else r["spec"]
        return dict(result, dtype=plan["dtype"], model=plan["model"])

    monkeypatch.setattr(bench, "_launch", fake_launch)
    records = bench.run(["none"], [128], ["int4:g32"], model=str(real_ckpt), log=lambda m: None, configs={"mine": MINE})
    assert plans[0]["specs"] == ["none", "int4:g32", "mine"]
    from megatron_tpcomp.config import CompressionConfig

    sent = CompressionConfig.from_dict(plans[0]["configs"]["mine"])
    assert sent == CompressionConfig.from_dict(MINE)  # the config itself, as validated, not a path
    json.dumps(plans[0])  # the plan is a JSON file
    assert [(r["spec"], r["config"]) for r in records] == [("none", False), ("int4:g32", False), ("mine", True)]
    with pytest.raises(ValueError, match="must be non-empty and differ from the specs"):
        bench.run(["none"], [128], ["int4:g32"], model=str(real_ckpt), configs={"int4:g32": MINE})
    with pytest.raises(ValueError, match="num_layers=7"):
        bad = {**MINE, "model": {"num_layers": 7}}
        bench.run(["none"], [128], ["int4:g32"], model=str(real_ckpt), configs={"mine": bad})


def test_plan_lists_the_specs_then_the_configs_and_an_absolute_perf_table(tmp_path: Path) -> None:
    table = tmp_path / "perf.json"
    plan = bench._plan("CKPT", ["none", "int4:g32"], {"mine": MINE}, "fp32", 3, 60.0, (32, 64), 4, 2, 1, str(table))
    assert list(plan) == [
        *("model", "dtype", "threads", "timeout_s", "prompt_lens", "gen_tokens"),
        *("specs", "configs", "reps", "warmup", "perf_table"),
    ]  # the label goes before and the workdir after, per link
    assert plan["specs"] == ["none", "int4:g32", "mine"] and plan["configs"] == {"mine": MINE}
    assert plan["prompt_lens"] == [32, 64] and plan["perf_table"] == str(table.resolve())
    assert bench._plan("CKPT", ["none"], {}, "bf16", 2, 1.0, [8], 2, 1, 0, None)["perf_table"] is None


def test_measure_link_labels_the_plan_and_marks_the_config_records(monkeypatch: pytest.MonkeyPatch) -> None:
    seen = []

    def fake_launch(world_size: int, link: object, plan: dict, workdir: str, timeout_s: float) -> dict:
        assert Path(workdir).is_dir() and plan["workdir"] == workdir and timeout_s == 9.0
        seen.append(plan)
        result = _fake_result(("none", "int4:g32", "auto"))
        for r in result["runs"]:  # the third setting plays the config
            r["spec"] = "mine" if r["spec"] == "auto" else r["spec"]
        return dict(result, dtype="fp32", model="CKPT")

    monkeypatch.setattr(bench, "_launch", fake_launch)
    plan = {"model": "CKPT", "specs": ["none", "int4:g32", "mine"], "configs": {"mine": MINE}}
    records = bench._measure_link(3, "1gbit", {"shaped": True}, None, plan, 9.0)
    assert list(seen[0]) == ["label", "model", "specs", "configs", "workdir"] and seen[0]["label"] == "TP=3, 1gbit"
    assert [(r["spec"], r["config"], r["link"], r["shaped"]) for r in records] == [
        ("none", False, "1gbit", True),
        ("int4:g32", False, "1gbit", True),
        ("mine", True, "1gbit", True),
    ]
    assert "workdir" not in plan  # the shared plan is left as it was


@pytest.mark.parametrize(
    "args, message",
    [
        ((1, 1, 0, 2, [8], "fp32", None), "--tp must be >= 2, got 1"),
        ((3, 0, 0, 2, [8], "fp32", None), "reps must be >= 1 and warmup >= 0, got 0 and 0"),
        ((3, 1, -1, 2, [8], "fp32", None), "reps must be >= 1 and warmup >= 0, got 1 and -1"),
        ((3, 1, 0, 1, [8], "fp32", None), "--gen-tokens must be >= 2 (one prefill token"),
        ((3, 1, 0, 2, [], "fp32", None), "--prompt-lens needs positive token counts, got []"),
        ((3, 1, 0, 2, [8, 0], "fp32", None), "--prompt-lens needs positive token counts, got [8, 0]"),
        ((3, 1, 0, 2, [8], "fp16", None), "unknown dtype 'fp16'; expected bf16 or fp32"),
        ((3, 1, 0, 2, [8], "fp32", "no/such.json"), "--perf-table no/such.json: no such file"),
    ],
)
def test_run_args_are_refused_naming_the_bad_value(args: tuple, message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        bench._check_run_args(*args)
    bench._check_run_args(3, 1, 0, 2, [8], "bf16", None)  # a good set passes


def test_options_resolve_the_defaults_and_an_empty_link_list(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(bench, "resolve_model", lambda model, tp: f"CKPT:{model}:{tp}")
    monkeypatch.setattr(bench, "check_specs_for_model", lambda specs, model, tp: None)
    parser = bench._parser()
    opts = bench._options(parser.parse_args(["--link", ",", "--specs", "fp8", "--burst", "256KiB"]))
    assert opts.links == ["none"] and opts.specs == ["none", "fp8"] and opts.model == "CKPT:None:3"
    assert opts.prompt_lens == [int(v) for v in bench.DEFAULT_PROMPT_LENS.split(",")]
    assert (opts.burst, opts.limit, opts.configs) == (256 * 1024, None, {})
    with pytest.raises(ValueError, match=re.escape("--limit 1024 B must be at least --burst 262144 B")):
        bench._options(parser.parse_args(["--link", "none", "--burst", "256KiB", "--limit", "1KiB"]))
    with pytest.raises(ValueError, match=re.escape("--warmup must be >= 0, got -1")):
        bench._options(parser.parse_args(["--link", "none", "--warmup", "-1"]))
