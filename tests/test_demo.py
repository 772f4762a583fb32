"""The main job (``make demo``) on the embedded real model, shortened: it runs, compresses, and reports."""

from __future__ import annotations

import pytest

from megatron_tpcomp import demo

pytestmark = pytest.mark.megatron


def test_demo_generates_with_and_without_int4_and_counts_bytes(real_assets: None) -> None:
    result = demo.run(prompts=["The state of our union is"], gen_tokens=6, ppl_tokens=128)
    base, comp = result["none"], result["int4:g32+had"]
    assert len(base["tokens"][0]) == len(comp["tokens"][0]) == 6
    assert base["text"][0].strip()  # real words came out
    assert base["wire_bytes"] == 0 and comp["compressed_calls"] > 0  # only the compressed run is counted
    # One-shot INT4 (4.5 bits/value incl. scales) to 2 peers vs the ring all-reduce of fp32 partials at 3 ranks:
    # (2 * 4.5 / 8) / (4/3 * 4) = 1 / 4.74; padding and small messages may cost a little.
    ratio = comp["baseline_wire_bytes"] / comp["wire_bytes"]
    assert 4.3 < ratio < 4.8, ratio
    # Real weights on real text (FACTS.md: ~22-24 at context 512; a 128-token slice varies more).
    assert 5.0 < base["ppl"] < 80.0 and 5.0 < comp["ppl"] < 120.0
    text = demo.report(result)
    assert "perplexity (held-out)" in text and "fewer than bf16" in text


def test_demo_rejects_a_bad_spec_before_starting(capsys: pytest.CaptureFixture[str]) -> None:
    assert demo.main(["--spec", "int4:g33x"]) == 2
    assert "int4:g33x" in capsys.readouterr().err
