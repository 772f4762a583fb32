"""Site names: ``str(Site)`` and :meth:`Site.parse` are inverses; bad names fail naming the text."""

from __future__ import annotations

import pytest

from megatron_tpcomp.megatron.site import Site, layer_sites


@pytest.mark.parametrize("site", [Site("mlp", 3), Site("attention", 0), Site("embedding"), Site("logits")])
def test_parse_inverts_str(site: Site) -> None:
    assert Site.parse(str(site)) == site


@pytest.mark.parametrize("text", ["layer3", "layerx.mlp", "layer-1.mlp", "layer2.ffn", "mlp", "layer2.mlp.x", ""])
def test_parse_rejects(text: str) -> None:
    with pytest.raises(ValueError, match="expected layerN"):
        Site.parse(text)


def test_layer_sites_and_order() -> None:
    sites = list(layer_sites(2))
    assert [str(s) for s in sites] == ["layer0.attention", "layer0.mlp", "layer1.attention", "layer1.mlp"]
    names = ["layer10.mlp", "embedding", "layer2.attention", "layer2.mlp"]
    assert sorted(names, key=lambda n: Site.parse(n).order) == [
        "embedding",
        "layer2.attention",
        "layer2.mlp",
        "layer10.mlp",
    ]
