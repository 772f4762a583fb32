"""The searched per-layer configs shipped in examples/configs/ load, fit SmolLM2-135M at TP=3, and carry the bits
per value their search predicted (every site's codec is rebuilt from the file)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from megatron_tpcomp.config import CompressionConfig
from megatron_tpcomp.evaluation import bits_per_value

CONFIGS = sorted((Path(__file__).resolve().parents[2] / "examples" / "configs").glob("*.json"))


def test_there_are_example_configs() -> None:
    assert len(CONFIGS) >= 2


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_example_config_is_valid_for_its_model(path: Path) -> None:
    cfg = CompressionConfig.load(path)
    cfg.check_model(num_layers=30, hidden_size=576, tp_size=3)
    meta = json.loads(path.read_text())["meta"]
    # The search sized each candidate on a [512, 576] message; so does this.
    assert bits_per_value(cfg, 30, (512, 576)) == pytest.approx(meta["predicted_bits_per_value"], abs=1e-9)
    if "chscale" in path.name:
        assert any(s.channel_scale_exponents for blocks in cfg.layers.values() for s in blocks.values())
