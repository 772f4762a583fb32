"""GGUF source: llama.cpp's Q/K permutation undone, and the embedded SmolLM2-135M read correctly."""

from __future__ import annotations

import pytest
import torch

from megatron_tpcomp.checkpoint import CheckpointError
from megatron_tpcomp.checkpoint.gguf_source import read_gguf, unpermute_rope_rows


def _llama_cpp_permute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """What llama.cpp's convert_hf_to_gguf.py does to q_proj/k_proj rows (documented formula)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


@pytest.mark.parametrize("heads,hn,cols", [(9, 64, 576), (3, 64, 576), (4, 8, 5), (2, 4, 0)])
def test_unpermute_inverts_llama_cpp_permutation(heads: int, hn: int, cols: int):
    shape = (heads * hn, cols) if cols else (heads * hn,)  # weights and biases
    w = torch.randn(shape, generator=torch.Generator().manual_seed(heads))
    permuted = _llama_cpp_permute(w, heads)
    assert not torch.equal(permuted, w)
    assert torch.equal(unpermute_rope_rows(permuted, heads), w)


def test_unpermute_rejects_rows_that_do_not_split_into_heads():
    with pytest.raises(CheckpointError, match="cannot un-permute"):
        unpermute_rope_rows(torch.zeros(10, 4), 3)


def test_missing_and_non_gguf_files(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        read_gguf(tmp_path / "none.gguf")
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGML" + b"\x00" * 64)
    with pytest.raises(CheckpointError, match="not a readable GGUF file"):
        read_gguf(bad)


def test_embedded_smollm2_reads_as_the_documented_architecture():
    from megatron_tpcomp import assets

    try:
        path = assets.default_gguf_path()
    except assets.AssetError as exc:
        pytest.skip(f"embedded model not installed: {exc}")
    cfg, sd, info = read_gguf(path, progress=False)
    assert (cfg.num_layers, cfg.hidden_size, cfg.num_attention_heads, cfg.num_query_groups) == (30, 576, 9, 3)
    assert (cfg.ffn_hidden_size, cfg.vocab_size, cfg.rotary_base, cfg.tie_embeddings) == (1536, 49152, 1e5, True)
    assert sd["model.layers.0.self_attn.q_proj.weight"].shape == (576, 576)
    assert sd["model.layers.0.self_attn.k_proj.weight"].shape == (192, 576)
    assert "lm_head.weight" not in sd and all(t.dtype == torch.float32 for t in sd.values())
    from tokenizers import Tokenizer

    tok = Tokenizer.from_str(info["tokenizer_json"])
    text = "The State of the Union in 2016: jobs grew by 14 million."
    ids = tok.encode(text, add_special_tokens=False).ids
    assert tok.decode(ids) == text
    assert len(ids) < len(text) / 2.5  # real BPE merges, not bytes
    assert tok.encode("<|im_start|>", add_special_tokens=False).ids == [1]  # control tokens stay whole
    assert info["eos_token_id"] == 2
