"""FP8 through Transformer Engine (GPU only): its payloads decode like the reference's."""

from __future__ import annotations

import pytest
import torch

from megatron_tpcomp.codecs.fp8 import HAVE_TE, Fp8Codec
from megatron_tpcomp.spec import parse_spec

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
    pytest.mark.skipif(not HAVE_TE, reason="needs Transformer Engine (pip install transformer-engine[pytorch])"),
]


@pytest.mark.parametrize("spec", ["fp8", "fp8-e5m2:b128", "fp8:b32:sfp16"])
def test_te_payload_matches_reference(spec: str) -> None:
    cs = parse_spec(spec)
    x = (torch.randn(512, 576, device="cuda") * 5).to(torch.bfloat16)
    te_payload = Fp8Codec(cs, backend="te").encode(x)
    ref_payload = Fp8Codec(cs, backend="torch").encode(x)
    ref = Fp8Codec(cs, backend="torch")
    # Same layout, decoded by the reference: identical values (the scales are computed by the same code).
    assert torch.equal(ref.decode(te_payload, x.shape, torch.float32), ref.decode(ref_payload, x.shape, torch.float32))
    print(f"{spec}: TE payload bytes identical to the reference: {bool(torch.equal(te_payload, ref_payload))}")
