"""Reliability of the command-line tools: results survive, bad requests are refused before any work, errors are
one line.

Each test failed on the code before its fix: output paths were written only at the end (a bad one cost the run),
one empty or overlong prompt killed its batch, negative sizes and empty spec lists were accepted, ``--tp 5`` was
found not to divide the model only after a conversion, a config for another model failed inside the ranks, a
missing perf_table meant the defaults, and a failed rank escaped ``tpcomp`` as a multi-rank traceback.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from megatron_tpcomp import calibration, cli, evaluation, textgen

ROOT = Path(__file__).resolve().parents[2]
LAUNCHER = ROOT / "examples" / "run_text_generation.py"
#: A small evaluation request: where the old code did not refuse it, it at least failed (or ran) quickly.
SMALL = ["--specs", "none", "--tokens", "64", "--context", "64", "--gen-tokens", "0", "--quiet"]


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT)}


def _one_error_line(err: str, prefix: str) -> str:
    """The single error line of ``err`` (stderr); fails if there are several or a traceback."""
    assert "Traceback" not in err, err[-3000:]
    lines = [line for line in err.splitlines() if line.startswith(prefix)]
    assert len(lines) == 1, err[-3000:]
    return lines[0]


# ------------------------------------------------------------------------------ output paths, before the work


@pytest.fixture
def bad_paths(tmp_path: Path) -> dict[str, tuple[Path, str]]:
    """Hostile output paths -> (path, the reason the error must give)."""
    a_dir = tmp_path / "a_dir"
    a_dir.mkdir()
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    return {
        "directory": (a_dir, "is a directory"),
        "parent is a file": (a_file / "out.json", "is a file, not a directory"),
        "grandparent is a file": (a_file / "sub" / "out.json", "is a file, not a directory"),
    }


@pytest.mark.parametrize("case", ["directory", "parent is a file", "grandparent is a file"])
def test_eval_refuses_a_bad_json_path_before_the_run(
    case: str, bad_paths: dict, capsys: pytest.CaptureFixture[str]
) -> None:
    path, why = bad_paths[case]
    # /nonexistent as the model: the output path must be judged first (before, the model was touched first and
    # the path only after the whole evaluation).
    rc = evaluation.main(["--model", "/nonexistent/ckpt", "--json", str(path), "--quiet"])
    err = capsys.readouterr().err
    assert rc == 2
    line = _one_error_line(err, "tpcomp eval: error:")
    assert f"--json {path}" in line and why in line


def test_every_tool_checks_its_output_paths_first(
    bad_paths: dict, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    d, _ = bad_paths["directory"]
    f_parent, _ = bad_paths["parent is a file"]
    # calibrate: --out and --stats-json (the statistics were written after the whole calibration)
    assert calibration.main(["--model", "/nonexistent", "--out", str(tmp_path / "c.json"), "--stats-json", str(d)]) == 2
    assert f"--stats-json {d}: is a directory" in capsys.readouterr().err
    assert calibration.main(["--model", "/nonexistent", "--out", str(f_parent)]) == 2
    assert f"--out {f_parent}" in capsys.readouterr().err
    # the text-generation launcher, before torchrun's variables are even looked at
    assert textgen.main(["--load", "/nonexistent", "--prompt", "x", "--output", str(d)]) == 2
    assert f"--output {d}: is a directory" in capsys.readouterr().err
    # benchmarks: a usage error before any timing (bench codecs used to time everything, then crash on write)
    for argv, flag in (
        (["bench", "codecs", "--specs", "int8:g32", "--sizes", "16KiB", "--reps", "1", "--json", str(d)], "--json"),
        (["bench", "perf-table", "--codecs", str(tmp_path / "none.json"), "--out", str(d)], "--out"),
        (["bench", "plot", "--e2e", str(tmp_path / "none.json"), "--out-dir", str(bad_paths["parent is a file"][0])],
         "--out-dir"),
    ):  # fmt: skip
        t0 = time.monotonic()
        try:
            rc = cli.main(argv)
        except SystemExit as exc:  # argparse's usage error
            rc = exc.code
        err = capsys.readouterr().err
        assert rc == 2 and flag in err, (argv, err)
        assert time.monotonic() - t0 < 20


def test_output_folders_are_created_and_files_written_atomically(tmp_path: Path) -> None:
    from megatron_tpcomp.cliutil import ResultsFile, atomic_write_json, check_output_file, partial_path

    out = check_output_file(tmp_path / "new" / "deeper" / "r.json", "--json")
    assert out.parent.is_dir()  # created, as `mkdir -p` would
    atomic_write_json(out, {"a": 1})
    assert json.loads(out.read_text()) == {"a": 1}
    assert sorted(p.name for p in out.parent.iterdir()) == ["r.json"]  # no temporary file left
    # Records: PATH.partial while running, PATH only once complete.
    rf = ResultsFile(tmp_path / "r.jsonl")
    rf.write({"i": 0})
    assert not (tmp_path / "r.jsonl").exists()
    assert partial_path(tmp_path / "r.jsonl").read_text() == '{"i": 0}\n'  # on disk already, not buffered
    rf.write({"i": 1})
    rf.commit()
    assert (tmp_path / "r.jsonl").read_text().splitlines() == ['{"i": 0}', '{"i": 1}']
    assert not partial_path(tmp_path / "r.jsonl").exists()


# ------------------------------------------------------------------------------------------ argument values


@pytest.mark.parametrize(
    ("argv", "flag", "value"),
    [
        (["specs", "--hidden", "0"], "--hidden", "0"),
        (["specs", "--tokens", "-5"], "--tokens", "-5"),
        (["eval", "--model", "/nonexistent", "--gen-tokens", "-1"], "--gen-tokens", "-1"),
        (["eval", "--model", "/nonexistent", "--tp", "0"], "--tp", "0"),
        (["eval", "--model", "/nonexistent", "--context", "1"], "--context", "1"),
        (["calibrate", "--model", "/nonexistent", "--out", "x.json", "--k", "-3"], "--k", "-3"),
        (["calibrate", "--model", "/nonexistent", "--out", "x.json", "--kl-budget", "nan"], "--kl-budget", "nan"),
        (["demo", "--model", "/nonexistent", "--gen-tokens", "0"], "--gen-tokens", "0"),
    ],
)
def test_bad_numbers_are_usage_errors_naming_flag_and_value(
    argv: list[str], flag: str, value: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as info:
        cli.main(argv)
    err = capsys.readouterr().err
    assert info.value.code == 2
    assert f"argument {flag}: expected" in err and repr(value) in err, err


@pytest.mark.parametrize(
    ("flag", "value"), [("--micro-batch-size", "-1"), ("--num-tokens-to-generate", "-1"), ("--temperature", "0")]
)
def test_textgen_bad_numbers_are_usage_errors(flag: str, value: str, capsys: pytest.CaptureFixture[str]) -> None:
    # --micro-batch-size -1 used to exit 0 with an empty output file
    with pytest.raises(SystemExit) as info:
        textgen.main(["--load", "/nonexistent", "--prompt", "x", flag, value])
    assert info.value.code == 2
    assert f"argument {flag}: expected" in capsys.readouterr().err


@pytest.mark.parametrize("specs", [",", " , ,", ""])
def test_eval_refuses_an_empty_spec_list(specs: str, capsys: pytest.CaptureFixture[str]) -> None:
    # Used to run a baseline-only evaluation.
    assert evaluation.main(["--model", "/nonexistent", "--specs", specs]) == 2
    line = _one_error_line(capsys.readouterr().err, "tpcomp eval: error:")
    assert "--specs" in line and "empty list" in line


# ------------------------------------------------------------------------------------- model fit, before work


@pytest.mark.parametrize("argv", [["eval", "--tp", "5"], ["calibrate", "--tp", "4", "--out", "OUT"]])
def test_a_tp_size_that_does_not_divide_the_model_fails_before_converting(
    argv: list[str], real_assets: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    # An empty cache: the old code converted the model (tens of seconds) before finding out.
    monkeypatch.setenv("TPCOMP_CACHE", str(tmp_path / "cache"))
    argv = [a.replace("OUT", str(tmp_path / "c.json")) for a in argv]
    t0 = time.monotonic()
    assert cli.main(argv) == 2
    elapsed = time.monotonic() - t0
    line = _one_error_line(capsys.readouterr().err, f"tpcomp {argv[0]}: error:")
    tp = argv[argv.index("--tp") + 1]
    assert f"--tp {tp}: smollm2-135m cannot be split {tp} ways" in line
    assert "num_attention_heads=9" in line  # what does not divide
    assert not (tmp_path / "cache" / "checkpoints").exists()  # nothing was converted
    # Reading the GGUF header takes ~3 s on an idle 2-core machine; a conversion takes ~40 s.
    assert elapsed < 30, elapsed


def test_a_checkpoint_for_another_tp_size_is_refused_before_the_ranks(real_ckpt: Path, capsys) -> None:
    assert evaluation.main(["--model", str(real_ckpt), "--tp", "2", *SMALL]) == 2
    line = _one_error_line(capsys.readouterr().err, "tpcomp eval: error:")
    assert "--tp 2" in line and "sharded for TP=3" in line


def _config_for_31_layers(tmp_path: Path) -> Path:
    path = tmp_path / "for-31-layers.json"
    path.write_text(json.dumps({"default": "int8:g32", "layers": {"30": {"mlp": "int4:g32"}}}))
    return path


def test_a_config_for_another_model_is_refused_before_any_rank(real_ckpt: Path, tmp_path: Path, capsys) -> None:
    cfg = _config_for_31_layers(tmp_path)
    t0 = time.monotonic()
    assert evaluation.main(["--model", str(real_ckpt), "--config", str(cfg), *SMALL]) == 2
    line = _one_error_line(capsys.readouterr().err, "tpcomp eval: error:")
    assert str(cfg) in line and "layer 30" in line and ("num_layers=30" in line or "30 layers" in line)
    assert time.monotonic() - t0 < 15  # no rank was started (they took 16-18 s to fail)
    # The launcher checks it on every rank before the process group forms (here: before torchrun's variables).
    assert textgen.main(["--load", str(real_ckpt), "--prompt", "x", "--tp-comm-compression-config", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert str(cfg) in err and "layer 30" in err


def test_a_spec_the_model_cannot_carry_is_refused_before_any_rank(real_ckpt: Path, capsys) -> None:
    # 600 outlier channels of a 576-wide model: every rank used to fail in its first encode.
    argv = ["--model", str(real_ckpt), "--specs", "int8:g32,int4:g32+outliers:k600", *SMALL[2:]]
    assert evaluation.main(argv) == 2
    line = _one_error_line(capsys.readouterr().err, "tpcomp eval: error:")
    assert "int4:g32+outliers:k600: layer 0 attention" in line and "576 channels" in line


def test_a_missing_perf_table_is_an_error_naming_the_config_and_the_path(
    real_ckpt: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from megatron_tpcomp.costmodel import CostModel

    cfg = tmp_path / "auto.json"
    cfg.write_text(json.dumps({"default": "int8:g32", "policy": "auto", "perf_table": "no-such-perf.json"}))
    assert evaluation.main(["--model", str(real_ckpt), "--config", str(cfg), *SMALL]) == 2
    line = _one_error_line(capsys.readouterr().err, "tpcomp eval: error:")
    assert str(cfg) in line and "'no-such-perf.json'" in line and str(Path("no-such-perf.json").resolve()) in line
    # Inside the ranks too (CostModel.load used to fall back to the published defaults silently).
    with pytest.raises(ValueError, match=r"perf_table '.*missing.json' \(resolved: .*missing.json\) does not exist"):
        CostModel.load(tmp_path / "missing.json")


# --------------------------------------------------------------------------------- failures inside the ranks


def _corrupt_copy(ckpt: Path, out: Path, rank: int) -> Path:
    """A copy of ``ckpt`` (shards linked, not copied) whose shard of ``rank`` keeps its size but not its bytes:
    only the rank's SHA-256 check, inside the run, can find it."""
    meta = json.loads((ckpt / "tpcomp_checkpoint.json").read_text())
    out.mkdir()
    for item in ckpt.iterdir():
        if item.is_file():
            shutil.copy(item, out / item.name)
    for rel, info in meta["files"].items():
        dst = out / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        if f"mp_rank_{rank:02d}" in rel:
            with open(dst, "wb") as f:
                f.truncate(int(info["bytes"]))  # same size, all zeros (sparse: no disk used)
        else:
            dst.symlink_to(ckpt / rel)
    return out


@pytest.mark.timeout(240)
def test_a_failed_rank_is_one_line_with_the_log_of_every_traceback(
    real_ckpt: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("TPCOMP_CACHE", str(tmp_path / "cache"))  # where the log goes
    monkeypatch.delenv("TPCOMP_DEBUG", raising=False)
    bad = _corrupt_copy(real_ckpt, tmp_path / "ckpt", rank=2)
    argv = ["eval", "--model", str(bad), "--specs", "int8:g32", "--tokens", "64", "--context", "64"]
    rc = cli.main([*argv, "--gen-tokens", "0", "--quiet"])  # used to raise DistributedRunError (100+ lines)
    err = capsys.readouterr().err
    assert rc == 1
    line = _one_error_line(err, "tpcomp eval: error:")
    # The first failing rank and its last exception line, and the ranks that were only waiting on it.
    assert "rank 2: CheckpointError:" in line and "SHA-256 does not match" in line
    assert "were waiting on it" in line and "[0, 1]" in line
    log = Path(line.rsplit("full traceback in ", 1)[1].rstrip(")"))
    text = log.read_text()
    assert "rank 2: Traceback" in text and "load_shard" in text  # every rank's traceback is kept there


# -------------------------------------------------------------------------------- results of a real run survive


def _torchrun(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "3", str(LAUNCHER)]
    return subprocess.run(cmd + args, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=600)


@pytest.mark.megatron
@pytest.mark.timeout(600)
def test_bad_prompts_are_skipped_with_an_error_record_and_the_batch_survives(real_ckpt: Path, tmp_path: Path) -> None:
    prompts = tmp_path / "prompts.jsonl"
    rows = [
        {"id": "a", "prompt": "The state of our union is"},
        {"id": "empty", "prompt": ""},
        {"id": "long", "prompt": "word " * 40},  # 41 tokens + 4 > 32
        {"id": "b", "prompt": "Tonight I"},
    ]
    prompts.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "new-folder" / "out.jsonl"  # the folder does not exist yet
    proc = _torchrun(
        ["--load", str(real_ckpt), "--prompts-file", str(prompts), "--num-tokens-to-generate", "4"]
        + ["--inference-max-seq-length", "32", "--micro-batch-size", "2", "--output", str(out)],
        tmp_path,
    )
    # Before: the empty prompt failed the attention's reshape and took its batch (and the run) down.
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["id"] for r in records] == ["a", "empty", "long", "b"]  # input order, one record per prompt
    by_id = {r["id"]: r for r in records}
    assert by_id["empty"]["error"] == "empty prompt (no tokens)" and "generated_tokens" not in by_id["empty"]
    assert "exceed --inference-max-seq-length 32" in by_id["long"]["error"]
    assert len(by_id["a"]["generated_tokens"]) == 4 and len(by_id["b"]["generated_tokens"]) == 4
    assert by_id["a"]["batch_size"] == 2  # the two good prompts were generated together
    assert "prompt 1 skipped: empty prompt (no tokens)" in proc.stderr
    assert re.search(r"prompt 2 skipped: \d\d prompt tokens \+ 4 to generate exceed", proc.stderr)
    assert sorted(p.name for p in out.parent.iterdir()) == ["out.jsonl"]  # no .partial left once complete


@pytest.mark.megatron
@pytest.mark.timeout(400)
def test_an_interrupted_eval_keeps_the_windows_it_finished(real_ckpt: Path, tmp_path: Path) -> None:
    out = tmp_path / "res" / "eval.json"
    cmd = [sys.executable, "-m", "megatron_tpcomp.cli", "eval", "--model", str(real_ckpt), "--specs", "int8:g32"]
    cmd += ["--tokens", str(64 * 400), "--context", "64", "--gen-tokens", "0", "--quiet", "--json", str(out)]
    # Its own session: the kill below reaches the ranks and the forkserver too, like a machine losing the job.
    proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    partial = out.with_name("eval.json.partial")
    try:
        deadline = time.monotonic() + 300
        while not partial.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert partial.exists(), proc.stderr.read().decode()[-3000:] if proc.poll() is not None else "timeout"
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # hard kill: no handler runs
        proc.wait(timeout=30)
    report = json.loads(partial.read_text())  # always valid JSON: it is replaced atomically
    assert report["complete"] is False and 1 <= report["windows"] < 400 and report["windows_planned"] == 400
    assert report["tokens"] == 64 * report["windows"]
    assert [r["spec"] for r in report["records"]] == ["none", "int8:g32"]
    assert report["records"][0]["kld"] == 0.0 and 0 < report["records"][1]["kld"] < 0.05
    assert not out.exists()  # nothing looks complete


@pytest.mark.megatron
@pytest.mark.timeout(300)
def test_a_finished_eval_writes_the_complete_report_and_no_partial(real_ckpt: Path, tmp_path: Path) -> None:
    out = tmp_path / "eval.json"
    argv = ["--model", str(real_ckpt), "--specs", "int8:g32", "--tokens", "128", "--context", "64"]
    assert evaluation.main([*argv, "--gen-tokens", "2", "--quiet", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["complete"] is True and report["windows"] == report["windows_planned"] == 2
    assert report["records"][1]["greedy_prefix_mean"] is not None
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("eval")) == ["eval.json"]
