"""Hadamard rotation: orthonormal, deterministic per seed, same payload layout as the inner codec."""

from __future__ import annotations

import pytest
import torch

from megatron_tpcomp.codecs import CodecError, make_codec
from megatron_tpcomp.codecs.hadamard import HadamardCodec, rotation_matrix


@pytest.mark.parametrize("block", [2, 16, 32, 128])
def test_rotation_is_orthonormal_and_seeded(block: int) -> None:
    r = rotation_matrix(block, seed=0)
    assert torch.allclose(r @ r.T, torch.eye(block), atol=1e-6)
    assert torch.equal(r, rotation_matrix(block, seed=0))
    assert not torch.equal(r, rotation_matrix(block, seed=1))


def test_block_must_be_a_power_of_two() -> None:
    with pytest.raises(CodecError, match="48"):
        rotation_matrix(48)


def test_payload_is_the_inner_payload_of_the_padded_rotation() -> None:
    x = torch.randn(3, 50, generator=torch.Generator().manual_seed(0))  # 150 values -> 160 padded
    had = make_codec("int4:g32+had")
    inner = make_codec("int4:g32")
    assert had.payload_nbytes(x.shape) == inner.payload_nbytes((160,))
    padded = torch.nn.functional.pad(x.reshape(-1), (0, 10)).view(-1, 32)
    rotated = (padded @ rotation_matrix(32).T).reshape(-1)
    assert torch.equal(had.encode(x), inner.encode(rotated))


def test_rotation_helps_int4_on_a_spiky_block() -> None:
    # One value per 32-block 20x larger than the rest: without rotation it sets the scale and flattens the
    # others to a few levels; the rotation spreads it (FACTS.md: +had:b32 cut int4's damage by ~2.7x).
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(512, 32, generator=gen)
    x[:, 5] *= 20
    errs = {}
    for spec in ("int4:g32", "int4:g32+had"):
        codec = make_codec(spec)
        y = codec.decode(codec.encode(x), x.shape, torch.float32)
        mask = torch.ones(32, dtype=torch.bool)
        mask[5] = False
        errs[spec] = float((y - x)[:, mask].norm() / x[:, mask].norm())
    assert errs["int4:g32+had"] < 0.6 * errs["int4:g32"], errs


def test_seed_must_match_to_decode() -> None:
    x = torch.randn(4, 64, generator=torch.Generator().manual_seed(3))
    a = HadamardCodec(make_codec("int8:g32"), block=32, seed=0)
    b = HadamardCodec(make_codec("int8:g32"), block=32, seed=7)
    good = a.decode(a.encode(x), x.shape, torch.float32)
    wrong = b.decode(a.encode(x), x.shape, torch.float32)
    assert float((good - x).abs().max()) < 0.05
    assert float((wrong - x).abs().max()) > 0.5
