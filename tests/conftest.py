"""Shared fixtures: seeded generators and a realistic row-parallel partial activation."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch


def heavy_tailed(shape: tuple[int, ...], seed: int = 0, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """Row-parallel partial like SmolLM2's down_proj ones: N(0,1) plus a few channels 100-3000x larger.

    Massive activations sit in a handful of fixed channels of the last dimension, which is what makes
    per-group scales, Hadamard rotations and outlier channels matter.
    """
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=gen)
    h = shape[-1]
    for ch, mult in ((1, 3000.0), (h // 3, 300.0), (h - 2, 100.0)):
        x[..., ch % h] *= mult
    return x.to(dtype)


@pytest.fixture
def gen() -> torch.Generator:
    """A freshly seeded CPU generator: every test that draws from it sees the same numbers on every run."""
    return torch.Generator().manual_seed(1234)


@pytest.fixture
def activations() -> torch.Tensor:
    """A bf16 ``[128, 576]`` heavy-tailed activation (128 tokens of SmolLM2-135M's hidden size)."""
    return heavy_tailed((128, 576), seed=3)


@pytest.fixture(scope="session")
def real_assets() -> None:
    """The embedded SmolLM2-135M and the State of the Union text; skips (with the reason) where they cannot be
    had. CI installs both (scripts/setup_venv.sh, npm)."""
    from megatron_tpcomp import assets

    try:
        assets.default_gguf_path()
        assets.ensure_sotu()
    except assets.AssetError as exc:
        pytest.skip(f"real model or text unavailable: {exc}")


@pytest.fixture(scope="session")
def real_ckpt(real_assets: None) -> Path:
    """SmolLM2-135M converted for TP=3 (once, into the cache)."""
    from megatron_tpcomp import assets

    return assets.ensure_checkpoint(assets.DEFAULT_MODEL, 3, progress=False)
