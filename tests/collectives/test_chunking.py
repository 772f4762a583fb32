"""Chunk plans: two-shot chunks and pipelined one-shot chunks end on codec blocks (no gloo needed)."""

from __future__ import annotations

import pytest
import torch

from megatron_tpcomp.codecs import make_codec
from megatron_tpcomp.collectives import chunking


def test_chunks_split_on_codec_blocks() -> None:
    x = torch.zeros(12, 3, 50)  # 1800 values
    chunks, shape = chunking.chunk_view(x, make_codec("fp8"), 4)
    assert shape == (512,) and chunks.shape == (4, 512)  # 450 rounded up to fp8's block of 128
    _, shape = chunking.chunk_view(x, make_codec("int4:g32+had:b64"), 3)
    assert shape == (640,)  # 600 rounded up to lcm(32, 64)
    chunks, shape = chunking.chunk_view(x, make_codec("int4:g32+outliers:k8"), 4)
    assert shape == (9, 50)  # 36 rows of 50 in 4 chunks of 9 whole rows
    assert chunking.chunk_shape(x.shape, make_codec("fp8"), 4) == (512,)  # the same without touching data


def test_unchunk_inverts_chunk_view() -> None:
    x = torch.randn(12, 3, 50)
    for spec in ("fp8", "int4:g32+outliers:k8"):
        chunks, _ = chunking.chunk_view(x, make_codec(spec), 3)
        assert torch.equal(chunking.unchunk(chunks, x.shape), x)


@pytest.mark.parametrize(
    ("nbytes", "device", "block_local", "chunks"),
    [(1 << 19, "cpu", True, 1), (4 << 20, "cpu", True, 4), (64 << 20, "cpu", True, 16), (4 << 20, "cuda", True, 1)]
    + [(4 << 20, "cpu", False, 1)],
)
def test_pipeline_rule(nbytes: int, device: str, block_local: bool, chunks: int) -> None:
    assert chunking.pipeline_chunks(nbytes, device, block_local) == chunks


def test_pipeline_plan_covers_the_message_on_block_boundaries() -> None:
    codec = make_codec("int4:g32+had")
    plan = chunking.pipeline_plan(1000 * 576, 16, codec)
    per = chunking.pipeline_per(1000 * 576, 16, codec)
    assert len(plan.pieces) <= 16 and sum(p[0] for p in plan.pieces) == 1000 * 576
    assert all(p == (per,) for p in plan.pieces[:-1]) and per % chunking.chunk_alignment(codec) == 0
    assert chunking.pipeline_plan(1000, 1, codec).pieces == ((1000,),)
    assert plan.payload_nbytes(codec) == sum(codec.payload_nbytes(p) for p in plan.pieces)
