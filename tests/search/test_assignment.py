"""A searched assignment (site -> candidate) becomes a valid per-layer config."""

from __future__ import annotations

import pytest

from megatron_tpcomp.search import assignment_to_config


def test_assignment_becomes_a_valid_config() -> None:
    data = assignment_to_config(
        {"layer0.mlp": "int4:g32+outliers", "layer0.attention": "none", "layer1.mlp": "int8:g32"},
        {"layer0.mlp": [3, 7, 11]},
        {"num_layers": 2, "hidden_size": 64, "tp_size": 2},
        {"kl_budget": 0.01},
    )
    assert data["layers"]["0"]["mlp"] == {"spec": "int4:g32+outliers", "outlier_channels": [3, 7, 11]}
    assert data["layers"]["1"]["mlp"] == "int8:g32" and data["default"] == "none"


def test_config_carries_the_plan_algorithm() -> None:
    data = assignment_to_config(
        {"layer0.mlp": "int4:g64+had@two-shot", "layer0.attention": "none"},
        {},
        {"num_layers": 1, "hidden_size": 64, "tp_size": 2},
        {},
    )
    assert data["algo"] == "two-shot" and data["layers"]["0"] == {"mlp": "int4:g64+had", "attention": "none"}
    mixed = assignment_to_config(
        {"layer0.mlp": "int4:g64+had@two-shot", "layer0.attention": "int8:g32", "layer1.mlp": "int8:g32+outliers"},
        {"layer1.mlp": [1, 2]},
        {},
        {},
    )
    assert mixed["algo"] == "one-shot" and mixed["layers"]["0"] == {
        "mlp": "int4:g64+had@two-shot",
        "attention": "int8:g32",
    }
    assert mixed["layers"]["1"]["mlp"] == {"spec": "int8:g32+outliers", "outlier_channels": [1, 2]}


def test_sites_outside_the_layers_are_refused() -> None:
    with pytest.raises(ValueError, match="'embedding': a searched assignment holds transformer-layer sites only"):
        assignment_to_config({"embedding": "int8:g32"}, {}, {}, {})
    with pytest.raises(ValueError, match="site 'layer0.ffn': expected layerN"):
        assignment_to_config({"layer0.ffn": "int8:g32"}, {}, {}, {})
