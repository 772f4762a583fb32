"""Reliability: checkpoints that cannot destroy data or load garbage.

Findings (each test failed on the code before its fix):

- ``tpcomp convert SRC OUT --force`` (and ``--to hf``) deleted any directory at OUT: now only tpcomp's own output
  (or an empty directory) is replaced; a file, a link or someone's directory is refused, naming the path.
- A SIGKILLed conversion left ``.OUT.partial-PID`` forever: a later run next to it removes it when its process is
  gone (logging the size) and leaves a live one alone.
- The metadata was never validated: NaN ``norm_epsilon``, 31 layers for 30, a 3e9 vocabulary were copied through
  by a reshard, ``tp_size: 1e9`` made ``read_metadata`` allocate without bound. Now every field is bounded on read
  and before writing, and the tensors are checked against it when loaded.

Hostile metadata is a modified copy of the real SmolLM2 TP=3 checkpoint's (its shards are linked, not copied).
"""

from __future__ import annotations

import hashlib
import json
import logging
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from megatron_tpcomp.checkpoint import CheckpointError, read_metadata
from megatron_tpcomp.checkpoint.convert import convert, export_hf
from megatron_tpcomp.checkpoint.locate import META_FILE
from megatron_tpcomp.checkpoint.metadata import shard_relpath
from megatron_tpcomp.checkpoint.store import load_shard, save_checkpoint
from megatron_tpcomp.checkpoint_cli import main
from megatron_tpcomp.megatron.model import ModelConfig, shard_state_dict

# Only names that existed before the fixes are imported, so that this file runs (and fails) on the old code too.
OWNER_FILE = ".tpcomp-writer.json"  # store.OWNER_FILE: host and PID of a partial directory's writer

REPO = Path(__file__).resolve().parents[2]
#: A tiny Llama-shaped model (2 layers, hidden 64, 8 heads in 4 KV groups, TP 1/2/4 divide it): enough to exercise
#: every path of writing and replacing, in milliseconds.
TINY = ModelConfig()


def _full_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """The TP=1 Megatron state dict of a tied Llama-family model without biases (written out independently of
    ``store.expected_shard_shapes``, which it therefore also checks)."""
    h, f = cfg.hidden_size, cfg.ffn_hidden_size
    qkv = (cfg.num_attention_heads + 2 * cfg.num_query_groups) * cfg.head_dim
    out = {"embedding.word_embeddings.weight": (cfg.vocab_size, h), "decoder.final_layernorm.weight": (h,)}
    for i in range(cfg.num_layers):
        p = f"decoder.layers.{i}."
        out |= {p + "input_layernorm.weight": (h,), p + "pre_mlp_layernorm.weight": (h,)}
        out |= {p + "self_attention.linear_qkv.weight": (qkv, h), p + "self_attention.linear_proj.weight": (h, h)}
        out |= {p + "mlp.linear_fc1.weight": (2 * f, h), p + "mlp.linear_fc2.weight": (h, f)}
    return out


def _tiny_ckpt(out: Path, tp: int = 1, *, force: bool = False, cfg: ModelConfig = TINY) -> Path:
    """Write a real checkpoint of random weights of :data:`TINY`, recording ``cfg`` as its model config."""
    gen = torch.Generator().manual_seed(0)
    full = {k: torch.randn(s, generator=gen) for k, s in _full_shapes(TINY).items()}
    save_checkpoint(
        out,
        lambda r: shard_state_dict(full, r, tp, TINY),
        model_config=cfg,
        tp_size=tp,
        dtype=torch.float32,
        force=force,
        progress=False,
    )
    return out


def _hostile_copy(real: Path, dest: Path, patch: Callable[[dict[str, Any]], None]) -> Path:
    """``dest`` = the real checkpoint with its metadata changed by ``patch`` (shards and tokenizer symlinked)."""
    dest.mkdir()
    for rel in [shard_relpath(r) for r in range(3)] + ["tokenizer.json", "latest_checkpointed_iteration.txt"]:
        (dest / rel).parent.mkdir(parents=True, exist_ok=True)
        (dest / rel).symlink_to(real / rel)
    data = json.loads((real / META_FILE).read_text())
    patch(data)
    (dest / META_FILE).write_text(json.dumps(data))  # json writes float('nan') as NaN, as a careless editor would
    return dest


def _set(path: str, value: Any) -> Callable[[dict[str, Any]], None]:
    def patch(data: dict[str, Any]) -> None:
        *parents, last = path.split(".")
        for p in parents:
            data = data[p]
        data[last] = value

    return patch


def _one_shard_listed(data: dict[str, Any]) -> None:
    """TP=1 with only rank 0's file listed: consistent in itself, but three shard directories are present."""
    data["tp_size"] = 1
    data["files"] = {k: v for k, v in data["files"].items() if "mp_rank_00" in k}


# ------------------------------------------------------------------------------------------------ --force


def _tree(d: Path) -> dict[str, bytes]:
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def test_force_never_deletes_what_tpcomp_did_not_write(real_ckpt: Path, tmp_path: Path) -> None:
    mine = tmp_path / "thesis"
    (mine / "chapters").mkdir(parents=True)
    (mine / "chapters" / "1.tex").write_text("three years of work")
    (mine / "notes.txt").write_text("do not delete")
    before = _tree(mine)
    a_file = tmp_path / "results.csv"
    a_file.write_text("a,b\n1,2\n")
    link = tmp_path / "link"
    link.symlink_to(mine)
    # The refusal comes before the (540 MB) source is read: the real checkpoint costs nothing here.
    for out, why in [(mine, "non-empty directory without tpcomp_checkpoint.json"), (a_file, "is a file")]:
        with pytest.raises(CheckpointError, match=why) as info:
            convert(real_ckpt, out, 1, force=True, progress=False)
        assert str(out) in str(info.value) and "refusing to delete it" in str(info.value)
        assert "\n" not in str(info.value)
        with pytest.raises(CheckpointError, match=why):
            export_hf(real_ckpt, out, force=True)
    with pytest.raises(CheckpointError, match="is a symbolic link"):
        convert(real_ckpt, link, 1, force=True, progress=False)
    assert _tree(mine) == before and a_file.read_text() == "a,b\n1,2\n" and link.is_symlink()


def test_force_cli_exits_2_with_one_line(real_ckpt: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    mine = tmp_path / "data"
    mine.mkdir()
    (mine / "keep.bin").write_bytes(b"\x01" * 10)
    for extra in ([], ["--to", "hf"]):
        assert main([str(real_ckpt), str(mine), "--tp", "1", "--force", *extra]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("tpcomp convert: error: ") and str(mine) in err and len(err.splitlines()) == 1, err
    assert (mine / "keep.bin").read_bytes() == b"\x01" * 10


def test_force_replaces_tpcomp_output_and_empty_directories_only(tmp_path: Path) -> None:
    src = _tiny_ckpt(tmp_path / "src", 2)
    empty = tmp_path / "empty"
    empty.mkdir()
    assert convert(src, empty, 1, force=True, progress=False).tp_size == 1  # an empty directory may be replaced
    assert convert(src, empty, 4, force=True, progress=False).tp_size == 4  # our own checkpoint may be
    assert read_metadata(empty).tp_size == 4
    # A checkpoint directory someone added a file to is not wholly ours any more.
    (empty / "my_eval_results.json").write_text("{}")
    with pytest.raises(CheckpointError, match=r"also holds \['my_eval_results\.json'\]"):
        convert(src, empty, 1, force=True, progress=False)
    assert read_metadata(empty).tp_size == 4 and (empty / "my_eval_results.json").exists()
    # HF exports carry a marker, so a re-export may replace them; a directory without it may not be.
    hf_out = export_hf(src, tmp_path / "hf")
    assert (hf_out / "tpcomp_hf_export.json").is_file()
    export_hf(src, hf_out, force=True)
    (hf_out / "tpcomp_hf_export.json").unlink()
    with pytest.raises(CheckpointError, match="not written by tpcomp"):
        export_hf(src, hf_out, force=True)
    # Nothing temporary is left next to the outputs.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "hf", "src"]


# ------------------------------------------------------------------------------------------ stale .partial-PID


def test_partial_of_a_killed_conversion_is_removed_by_the_next_run(
    real_ckpt: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    out = tmp_path / "ck"
    code = textwrap.dedent(
        f"""
        from megatron_tpcomp.checkpoint.convert import convert
        convert({str(real_ckpt)!r}, {str(out)!r}, 1, progress=False)
        """
    )
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=REPO)
    partial = tmp_path / f".ck.partial-{proc.pid}"
    shard = partial / shard_relpath(0)
    try:
        deadline = time.monotonic() + 300
        while not (shard.is_file() and shard.stat().st_size > 0):  # killed while it writes the 540 MB shard
            assert proc.poll() is None, "the conversion ended before it could be killed"
            assert time.monotonic() < deadline, "no partial directory appeared within 300 s"
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    assert partial.is_dir() and not out.exists()  # what a SIGKILL leaves: nothing else ever removed it
    size_mb = sum(p.stat().st_size for p in partial.rglob("*") if p.is_file()) / 1e6
    # A live writer's directory and one written on another host (shared file system) are left alone.
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    live = tmp_path / f".ck.partial-{sleeper.pid}"
    live.mkdir()
    elsewhere = tmp_path / f".ck.partial-{proc.pid}1"
    elsewhere.mkdir()
    (elsewhere / OWNER_FILE).write_text(json.dumps({"host": "another-node", "pid": proc.pid}))
    try:
        with caplog.at_level(logging.WARNING, logger="megatron_tpcomp"):
            _tiny_ckpt(out)
        assert not partial.exists() and read_metadata(out).tp_size == 1
        assert live.is_dir() and elsewhere.is_dir()
        logged = caplog.text
        assert f"removed stale {partial} ({size_mb:.1f} MB) left by PID {proc.pid}, which is no longer" in logged
        assert f"{live} belongs to PID {sleeper.pid}, which is still running; left alone" in logged
        assert f"{elsewhere} was written on host another-node" in logged
    finally:
        sleeper.kill()
        sleeper.wait()
    # Once its process is gone, the next run removes that one too.
    _tiny_ckpt(out, force=True)
    assert not live.exists() and elsewhere.is_dir()


# ----------------------------------------------------------------------------------------- hostile metadata


@pytest.mark.parametrize(
    ("patch", "message"),
    [
        (_set("model_config.norm_epsilon", float("nan")), "model_config.norm_epsilon is nan; expected a finite"),
        (_set("model_config.norm_epsilon", -1e-5), "model_config.norm_epsilon is -1e-05; expected a finite number"),
        (_set("model_config.rotary_base", float("inf")), "model_config.rotary_base is inf; expected a finite"),
        (_set("model_config.vocab_size", 3e9), "model_config.vocab_size is 3000000000.0; expected an integer in"),
        (_set("model_config.vocab_size", 3_000_000_000), "vocab_size is 3000000000; expected an integer in [1, 1677"),
        (_set("model_config.num_layers", "30"), "model_config.num_layers is '30'; expected an integer"),
        (_set("model_config.hidden_size", 577), "hidden_size is 577; expected a multiple of num_attention_heads=9"),
        (_set("model_config.tie_embeddings", "yes"), "model_config.tie_embeddings is 'yes'; expected true or false"),
        (_set("model_config.vocab_size", 49153), "tp_size is 3, which does not divide the model: TP size 3 does not"),
        (_set("model_config.num_heads", 9), "unknown key(s) ['num_heads'] in model_config"),
        (_set("tp_size", 1), "tp_size is 1, but 'files' lists 3 shard(s)"),
        (_one_shard_listed, "tp_size is 1, but"),
        (_set("tp_size", 3.0), "tp_size is 3.0; expected an integer in [1, 4096]"),
        (_set("tokenizer.file", "../../../../etc/passwd"), "tokenizer.file is '../../../../etc/passwd'; expected a"),
        (_set("tokenizer.eos_id", 49152), "tokenizer.eos_id is 49152; expected null or an integer in [0, 49152)"),
        (_set("dtype", "float16"), "dtype is 'float16'; expected one of"),
        (_set("compression", {"default": "int4", "model": {"num_layers": 24}}), "is for num_layers=24, but the"),
        (_set("compression", {"layers": {"30": {"mlp": "fp8"}}}), "sets layer 30, but the checkpoint"),
    ],
    ids=lambda v: v if isinstance(v, str) else "",
)
def test_hostile_metadata_is_refused_on_read(real_ckpt: Path, tmp_path: Path, patch: Callable, message: str) -> None:
    bad = _hostile_copy(real_ckpt, tmp_path / "bad", patch)
    with pytest.raises(CheckpointError) as info:
        read_metadata(bad)
    msg = str(info.value)
    assert message in msg and str(bad / META_FILE) in msg and "\n" not in msg, msg


def _read_metadata_in_a_capped_process(ckpt: Path) -> subprocess.CompletedProcess:
    """``read_metadata(ckpt)`` in a child whose address space may grow by only 1 GiB (RLIMIT_AS): metadata that
    makes the reader allocate without bound ends in MemoryError there, not on this machine."""
    code = textwrap.dedent(
        f"""
        import resource, re, sys
        from megatron_tpcomp.checkpoint import CheckpointError, read_metadata
        vm = int(re.search(r"VmSize:\\s+(\\d+) kB", open("/proc/self/status").read())[1]) * 1024
        resource.setrlimit(resource.RLIMIT_AS, (vm + (1 << 30), resource.RLIM_INFINITY))
        try:
            read_metadata({str(ckpt)!r})
        except CheckpointError as exc:
            print("REFUSED:", exc)
            sys.exit(3)
        """
    )
    return subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("tp", [1e9, 10**9])
def test_a_huge_tp_size_is_refused_before_anything_is_allocated(real_ckpt: Path, tmp_path: Path, tp: float) -> None:
    bad = _hostile_copy(real_ckpt, tmp_path / "bad", _set("tp_size", tp))
    t0 = time.monotonic()
    proc = _read_metadata_in_a_capped_process(bad)
    assert proc.returncode == 3, proc.stdout + proc.stderr[-2000:]
    assert f"tp_size is {tp!r}; expected an integer in [1, 4096]" in proc.stdout
    assert time.monotonic() - t0 < 120  # the old reader ran out of memory building 1e9 shard names


def test_a_layer_count_that_the_shards_do_not_hold_is_not_copied_through_a_reshard(
    real_ckpt: Path, tmp_path: Path
) -> None:
    bad = _hostile_copy(real_ckpt, tmp_path / "bad", _set("model_config.num_layers", 31))
    read_metadata(bad)  # every field is in bounds: only the tensors can tell
    with pytest.raises(CheckpointError) as info:
        convert(bad, tmp_path / "resharded", 1, progress=False)
    msg = str(info.value)
    assert str(bad / shard_relpath(0)) in msg and "holds layers 0..29 (30 layers)" in msg and "num_layers=31" in msg
    assert not (tmp_path / "resharded").exists()


def test_a_hidden_size_or_vocabulary_the_shards_do_not_hold_is_refused_on_load(tmp_path: Path) -> None:
    ck = _tiny_ckpt(tmp_path / "ck", 2)
    meta_file = ck / META_FILE
    good = meta_file.read_text()
    data = json.loads(good)
    data["model_config"]["vocab_size"] = 256  # the shards hold 128 rows, 64 per rank
    meta_file.write_text(json.dumps(data))
    with pytest.raises(CheckpointError) as info:
        load_shard(read_metadata(ck), 1)
    assert "embedding.word_embeddings.weight has shape (64, 64), but the metadata" in str(info.value)
    assert "vocab_size=256" in str(info.value) and "implies (128, 64)" in str(info.value)
    data = json.loads(good)
    data["model_config"]["hidden_size"] = 128  # 8 heads still divide it
    meta_file.write_text(json.dumps(data))
    with pytest.raises(CheckpointError, match=r"word_embeddings\.weight has shape \(64, 64\), .* implies \(64, 128\)"):
        load_shard(read_metadata(ck), 0)


def test_nan_weights_are_refused_on_load(tmp_path: Path) -> None:
    ck = _tiny_ckpt(tmp_path / "ck", 2)
    shard = ck / shard_relpath(1)
    blob = torch.load(shard, weights_only=False)  # our own file, just written: trusted
    blob["model"]["decoder.layers.1.mlp.linear_fc2.weight"][3, 5] = float("nan")
    torch.save(blob, shard)
    # Rewrite size and checksum as a careless tool would, so that only the values are wrong.
    data = json.loads((ck / META_FILE).read_text())
    data["files"][shard_relpath(1)] = {
        "bytes": shard.stat().st_size,
        "sha256": hashlib.sha256(shard.read_bytes()).hexdigest(),
    }
    (ck / META_FILE).write_text(json.dumps(data))
    with pytest.raises(CheckpointError, match=r"linear_fc2\.weight holds 1 NaN/Inf value\(s\)"):
        load_shard(read_metadata(ck), 1)


def test_invalid_metadata_is_never_written(tmp_path: Path) -> None:
    for cfg, message in [
        (ModelConfig(norm_epsilon=float("nan")), "model_config.norm_epsilon is nan"),
        (ModelConfig(vocab_size=3_000_000_000), "model_config.vocab_size is 3000000000; expected an integer"),
    ]:
        with pytest.raises(CheckpointError, match=message):
            _tiny_ckpt(tmp_path / "out", 2, cfg=cfg)
        assert list(tmp_path.iterdir()) == []  # refused before a directory was made
    # Shards that do not match the config are refused before they are written, too.
    with pytest.raises(CheckpointError, match="holds layers 0..1 .2 layers., but the metadata says num_layers=3"):
        _tiny_ckpt(tmp_path / "out", 2, cfg=ModelConfig(num_layers=3))
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("rms_norm_eps", float("nan"), "rms_norm_eps is nan; expected a finite number > 0"),
        ("num_hidden_layers", 2.5, "num_hidden_layers is 2.5; expected an integer in [1, 4096]"),  # int() made it 2
        ("rope_theta", -10000.0, "rope_theta is -10000.0; expected a finite number > 0"),
    ],
)
def test_hostile_hugging_face_config_is_refused(tmp_path: Path, key: str, value: Any, message: str) -> None:
    hf_dir = export_hf(_tiny_ckpt(tmp_path / "ck"), tmp_path / "hf")  # a real HF directory (safetensors)
    cfg = json.loads((hf_dir / "config.json").read_text())
    cfg[key] = value
    (hf_dir / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError) as info:
        convert(hf_dir, tmp_path / "out", 1, progress=False)
    assert str(info.value) == f"{hf_dir / 'config.json'}: {message}"
    assert not (tmp_path / "out").exists()
