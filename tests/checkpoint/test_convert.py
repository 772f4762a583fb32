"""Converter: HF -> Megatron logits match transformers, round trips are exact, resharding, bad inputs.

Small random-weight Llama-family models (transformers builds them, save_pretrained writes safetensors), so the
reference is an independent implementation of the same architecture.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
from pathlib import Path

import pytest
import torch

from megatron_tpcomp.checkpoint import CheckpointError, read_metadata
from megatron_tpcomp.checkpoint.convert import convert, export_hf
from megatron_tpcomp.checkpoint.metadata import shard_relpath
from megatron_tpcomp.checkpoint.store import load_shard
from megatron_tpcomp.checkpoint_cli import main
from megatron_tpcomp.launch import run_distributed

transformers = pytest.importorskip("transformers", reason="transformers is the reference implementation")
pytestmark = pytest.mark.megatron

# 6 query heads, 3 KV heads: TP 1 and 3 divide both; ffn and vocab divisible by 3.
SMALL = dict(
    hidden_size=96,
    intermediate_size=192,
    num_hidden_layers=2,
    num_attention_heads=6,
    num_key_value_heads=3,
    vocab_size=192,
    max_position_embeddings=64,
    rms_norm_eps=1e-5,
    rope_theta=10000.0,
)
#: fp32 logits of two implementations of the same math differ by summation order only: measured ~1e-6 relative;
#: 1e-4 of the logit scale leaves room for other BLAS paths, while any layout error (a swapped head, an
#: un-permuted row, gate/up exchanged) moves logits by O(1).
REL_TOL = 1e-4


def _hf_model(kind: str, tie: bool, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    if kind == "qwen2":
        cfg = transformers.Qwen2Config(**SMALL, tie_word_embeddings=tie)
        model = transformers.Qwen2ForCausalLM(cfg)
    elif kind == "mistral":
        cfg = transformers.MistralConfig(**SMALL, tie_word_embeddings=tie, sliding_window=None)
        model = transformers.MistralForCausalLM(cfg)
    else:
        cfg = transformers.LlamaConfig(**SMALL, tie_word_embeddings=tie)
        model = transformers.LlamaForCausalLM(cfg)
    with torch.no_grad():  # default init is tiny: scale up so that logits are far from uniform
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
            else:
                p.normal_(0.0, 0.08)
    return model.eval()


def _megatron_logits(rank: int, world_size: int, ckpt: str, tokens: list[list[int]]) -> torch.Tensor:
    from megatron_tpcomp.checkpoint import load_model
    from megatron_tpcomp.megatron import cpu
    from megatron_tpcomp.megatron import model as M

    cpu.enable_cpu_inference()
    M.init_parallel(world_size)
    model, _ = load_model(ckpt)
    t = torch.tensor(tokens)
    pos = torch.arange(t.shape[1]).expand_as(t)
    with torch.no_grad():
        out = model(t, pos, attention_mask=None, runtime_gather_output=True)
    M.destroy_parallel()
    return out


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("hf")
    out = {}
    for kind, tie in (("llama", False), ("llama", True), ("qwen2", False), ("mistral", True)):
        d = root / f"{kind}-{'tied' if tie else 'untied'}"
        _hf_model(kind, tie).save_pretrained(d, safe_serialization=True)
        out[d.name] = d
    return out


@pytest.mark.parametrize("name", ["llama-untied", "llama-tied", "qwen2-untied", "mistral-tied"])
def test_converted_logits_match_transformers_at_tp1_and_tp3(hf_dirs: dict[str, Path], tmp_path: Path, name: str):
    src = hf_dirs[name]
    ref_model = transformers.AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    tokens = torch.randint(0, SMALL["vocab_size"], (2, 24), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        ref = ref_model(tokens).logits  # [2, 24, vocab]
    scale = ref.abs().max().item()
    assert scale > 1.0  # a model whose logits are all ~0 would match anything
    for tp in (1, 3):
        ckpt = convert(src, tmp_path / f"tp{tp}", tp, progress=False)
        got = run_distributed(_megatron_logits, tp, str(ckpt.path), tokens.tolist(), timeout_s=240)
        for r in range(tp):
            err = (got[r] - ref).abs().max().item() / scale
            assert err < REL_TOL, f"{name} TP={tp} rank {r}: max |diff| / max |logit| = {err:.2e}"


def _safetensors(d: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out: dict[str, torch.Tensor] = {}
    for f in sorted(d.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


@pytest.mark.parametrize("name", ["llama-untied", "llama-tied", "qwen2-untied"])
def test_hf_megatron_hf_round_trip_is_exact(hf_dirs: dict[str, Path], tmp_path: Path, name: str):
    src = hf_dirs[name]
    convert(src, tmp_path / "tp3", 3, progress=False)
    export_hf(tmp_path / "tp3", tmp_path / "back")
    before, after = _safetensors(src), _safetensors(tmp_path / "back")
    if "tied" in name and "untied" not in name:
        before.pop("lm_head.weight", None)  # a tied model's lm_head is the embedding; we store it once
    assert sorted(before) == sorted(after)
    for k in before:
        assert before[k].dtype == after[k].dtype == torch.float32, k
        assert torch.equal(before[k], after[k]), k
    a = json.loads((src / "config.json").read_text())
    b = json.loads((tmp_path / "back" / "config.json").read_text())
    for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "vocab_size"):
        assert a[key] == b[key], key
    assert a["model_type"] == b["model_type"]
    # The exported directory is itself a valid source: transformers loads it.
    transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "back")


def test_reshard_1_to_3_to_1_reproduces_every_shard(hf_dirs: dict[str, Path], tmp_path: Path):
    tp1 = convert(hf_dirs["llama-untied"], tmp_path / "tp1", 1, progress=False)
    tp3 = convert(tmp_path / "tp1", tmp_path / "tp3", 3, progress=False)
    again = convert(tmp_path / "tp3", tmp_path / "tp1-again", 1, progress=False)
    assert tp3.tp_size == 3 and tp3.source["resharded_from_tp"] == 1
    a, b = load_shard(tp1, 0), load_shard(again, 0)
    assert sorted(a) == sorted(b)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    # Each TP=3 shard holds a third of every split tensor.
    s0 = load_shard(tp3, 0)
    assert s0["decoder.layers.0.mlp.linear_fc2.weight"].shape == (96, 64)
    assert s0["embedding.word_embeddings.weight"].shape == (64, 96)


def test_checkpoint_records_config_tokenizer_source_and_compression(hf_dirs: dict[str, Path], tmp_path: Path):
    cfg_file = tmp_path / "layers.json"
    cfg_file.write_text(json.dumps({"default": "int4:g32", "layers": {"1": {"mlp": "none"}}}))
    rc = main([str(hf_dirs["llama-tied"]), str(tmp_path / "ck"), "--tp", "3", "--compression-config", str(cfg_file)])
    assert rc == 0
    meta = read_metadata(tmp_path / "ck")
    assert meta.tp_size == 3 and meta.model_config.num_query_groups == 3 and meta.model_config.tie_embeddings
    assert meta.source["format"] == "huggingface" and meta.source["model_type"] == "llama"
    assert meta.compression["default"].startswith("int4:g32") and meta.compression["layers"]["1"]["mlp"] == "none"
    assert (tmp_path / "ck" / "latest_checkpointed_iteration.txt").read_text() == "release"


# ------------------------------------------------------------------------------------------------ bad inputs


def test_refuses_to_overwrite_without_force(hf_dirs: dict[str, Path], tmp_path: Path):
    out = tmp_path / "ck"
    convert(hf_dirs["llama-untied"], out, 1, progress=False)
    with pytest.raises(CheckpointError, match="already exists; pass --force"):
        convert(hf_dirs["llama-untied"], out, 3, progress=False)
    assert read_metadata(out).tp_size == 1  # untouched
    convert(hf_dirs["llama-untied"], out, 3, progress=False, force=True)
    assert read_metadata(out).tp_size == 3
    assert [p.name for p in tmp_path.iterdir()] == ["ck"]  # no temporary or old directories left


def test_interrupted_conversion_leaves_nothing_that_looks_complete(
    hf_dirs: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    from megatron_tpcomp.checkpoint import convert as convert_module

    calls = {"n": 0}
    real = convert_module.shard_state_dict

    def dies_on_second_shard(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt  # what Ctrl-C mid-conversion raises
        return real(*args, **kwargs)

    monkeypatch.setattr(convert_module, "shard_state_dict", dies_on_second_shard)
    with pytest.raises(KeyboardInterrupt):
        convert(hf_dirs["llama-untied"], tmp_path / "ck", 3, progress=False)
    assert list(tmp_path.iterdir()) == []  # neither the output nor its temporary directory
    monkeypatch.setattr(convert_module, "shard_state_dict", real)
    assert convert(hf_dirs["llama-untied"], tmp_path / "ck", 3, progress=False).tp_size == 3  # rerun works


def test_bad_sources_name_the_file_and_the_problem(hf_dirs: dict[str, Path], tmp_path: Path):
    with pytest.raises(CheckpointError, match="does not exist"):
        convert(tmp_path / "nope", tmp_path / "out", 1)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CheckpointError, match=r"config\.json is missing"):
        convert(empty, tmp_path / "out", 1)
    (empty / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match=r"config\.json: not valid JSON"):
        convert(empty, tmp_path / "out", 1)
    (empty / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(CheckpointError, match="model_type 'gpt2' is not one of"):
        convert(empty, tmp_path / "out", 1)
    # A tensor missing, a tensor of the wrong shape.
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text((hf_dirs["llama-untied"] / "config.json").read_text())
    from safetensors.torch import save_file

    sd = _safetensors(hf_dirs["llama-untied"])
    save_file({k: v for k, v in sd.items() if "layers.1.mlp.up_proj" not in k}, str(broken / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"missing, e\.g\. \['model\.layers\.1\.mlp\.up_proj\.weight'\]"):
        convert(broken, tmp_path / "out", 1)
    sd["model.layers.0.self_attn.k_proj.weight"] = torch.zeros(7, 96)
    save_file(sd, str(broken / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"k_proj\.weight has shape \(7, 96\)"):
        convert(broken, tmp_path / "out", 1)
    (broken / "model.safetensors").write_bytes(b"\x00" * 100)
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        convert(broken, tmp_path / "out", 1)
    # TP size that does not divide the heads.
    with pytest.raises(CheckpointError, match="TP size 4 does not divide"):
        convert(hf_dirs["llama-untied"], tmp_path / "out", 4)
    assert not (tmp_path / "out").exists()


class _Exploit:
    def __reduce__(self):
        return (os.system, ("touch PWNED",))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol:UserWarning")
def test_pickled_code_is_never_executed(tmp_path: Path, hf_dirs: dict[str, Path], monkeypatch: pytest.MonkeyPatch):
    monkeypatch.chdir(tmp_path)
    evil = tmp_path / "evil"
    evil.mkdir()
    (evil / "config.json").write_text((hf_dirs["llama-untied"] / "config.json").read_text())
    (evil / "pytorch_model.bin").write_bytes(pickle.dumps({"model.embed_tokens.weight": _Exploit()}))
    with pytest.raises(CheckpointError, match="cannot be loaded weights-only"):
        convert(evil, tmp_path / "out", 1)
    assert not (tmp_path / "PWNED").exists()


def test_truncated_or_corrupted_shards_are_detected(hf_dirs: dict[str, Path], tmp_path: Path):
    meta = convert(hf_dirs["llama-untied"], tmp_path / "ck", 3, progress=False)
    shard = tmp_path / "ck" / shard_relpath(1)
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, one byte flipped
    shard.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="SHA-256 does not match"):
        load_shard(read_metadata(meta.path), 1)
    shard.write_bytes(bytes(data[:1000]))
    with pytest.raises(CheckpointError, match="truncated or replaced"):
        read_metadata(meta.path)
    shard.unlink()
    with pytest.raises(CheckpointError, match=r"shard release/mp_rank_01/model_optim_rng\.pt is missing"):
        read_metadata(meta.path)
    (tmp_path / "ck" / "tpcomp_checkpoint.json").unlink()
    with pytest.raises(CheckpointError, match="not a megatron-tpcomp checkpoint"):
        read_metadata(meta.path)


def _load_at(rank: int, world_size: int, ckpt: str) -> str:
    from megatron_tpcomp.checkpoint import load_model
    from megatron_tpcomp.megatron import cpu
    from megatron_tpcomp.megatron import model as M

    cpu.enable_cpu_inference()
    M.init_parallel(world_size)
    try:
        load_model(ckpt)
    except CheckpointError as exc:
        return str(exc)
    return "loaded"


def test_loading_at_the_wrong_tp_size_says_how_to_reshard(hf_dirs: dict[str, Path], tmp_path: Path):
    convert(hf_dirs["llama-untied"], tmp_path / "ck", 3, progress=False)
    msgs = run_distributed(_load_at, 1, str(tmp_path / "ck"), timeout_s=120)
    assert "sharded for TP=3 but this run uses TP=1" in msgs[0] and "tpcomp convert" in msgs[0]


def test_cli_errors_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    assert main([str(tmp_path / "missing"), str(tmp_path / "out")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_a_config_that_does_not_match_the_weights_is_refused(hf_dirs: dict[str, Path], tmp_path: Path):
    convert(hf_dirs["llama-untied"], tmp_path / "ck", 1, progress=False)
    meta_file = tmp_path / "ck" / "tpcomp_checkpoint.json"
    data = json.loads(meta_file.read_text())
    data["model_config"]["ffn_hidden_size"] = 96  # the weights were saved with 192
    meta_file.write_text(json.dumps(data))
    msg = run_distributed(_load_at, 1, str(tmp_path / "ck"), timeout_s=120)[0]
    # Caught when the shard is loaded (before the model is built from the wrong metadata), naming file and tensor.
    assert "mp_rank_00/model_optim_rng.pt: decoder.layers.0.mlp.linear_fc1.weight has shape (384, 96)" in msg, msg
    assert "ffn_hidden_size=96, TP=1) implies (192, 96)" in msg, msg


def test_a_compression_config_for_another_model_is_refused_before_writing(
    hf_dirs: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
):
    other = tmp_path / "for-30-layers.json"
    other.write_text(json.dumps({"default": "int4:g32", "model": {"num_layers": 30, "tp_size": 3}}))
    src = hf_dirs["llama-tied"]
    assert main([str(src), str(tmp_path / "ck"), "--tp", "3", "--compression-config", str(other)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (
        f"tpcomp convert: error: {other}: compression config is for num_layers=30, but {src} at TP=3 has num_layers=2"
    )
    assert not (tmp_path / "ck").exists()
    # A recorded config made for TP=3 is not carried into a TP=1 reshard (it was calibrated for TP=3's partials).
    mine = tmp_path / "for-tp3.json"
    mine.write_text(json.dumps({"default": "int4:g32", "model": {"num_layers": 2, "tp_size": 3}}))
    assert main([str(src), str(tmp_path / "ck"), "--tp", "3", "--compression-config", str(mine), "--quiet"]) == 0
    assert read_metadata(tmp_path / "ck").compression["model"]["tp_size"] == 3
    assert convert(tmp_path / "ck", tmp_path / "ck3", 3, progress=False).compression is not None  # same TP: kept
    with caplog.at_level(logging.WARNING, logger="megatron_tpcomp"):
        assert convert(tmp_path / "ck", tmp_path / "ck1", 1, progress=False).compression is None
    assert "records a compression config made for tp_size=3; not kept at TP=1" in caplog.text
