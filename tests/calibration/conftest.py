"""The calibration result on the embedded real model, measured once for every calibration test."""

from __future__ import annotations

import pytest

from megatron_tpcomp import calibration


@pytest.fixture(scope="session")
def result(real_assets: None) -> dict:
    return calibration.calibrate(tokens=512, heldout_tokens=256, context=256)
