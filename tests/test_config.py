"""Compression config files: schema validation with clear errors, JSON and YAML, per-layer lookup."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from megatron_tpcomp.config import CompressionConfig, ConfigError

EXAMPLE = {
    "version": 1,
    "default": "int4:g32+had",
    "embedding": "none",
    "logits": "none",
    "min_bytes": 4096,
    "algo": "one-shot",
    "layers": {
        "0": {"attention": "fp8", "mlp": "int8:g32"},
        "11": {"mlp": {"spec": "int4:g32+outliers", "outlier_channels": [5, 9, 300]}},
        "29": {"mlp": "none"},
    },
    "model": {"num_layers": 30, "hidden_size": 576, "tp_size": 3},
}


def test_lookup_per_layer_and_default() -> None:
    cfg = CompressionConfig.from_dict(EXAMPLE)
    assert cfg.setting_for("attention", 0).spec == "fp8-e4m3:b128:sfp32"
    assert cfg.setting_for("mlp", 0).spec == "int8:g32:sfp16"
    assert cfg.setting_for("attention", 5).spec == "int4:g32:sfp16+had:b32"
    assert cfg.codec_for("mlp", 29) is None
    assert cfg.codec_for("embedding", None) is None
    outlier_codec = cfg.codec_for("mlp", 11)
    assert outlier_codec.channels.tolist() == [5, 9, 300]
    assert cfg.codec_for("mlp", 11) is outlier_codec  # built once
    assert cfg.min_bytes == 4096 and cfg.algo == "one-shot"


@pytest.mark.parametrize("suffix", [".json", ".yaml"])
def test_files_round_trip(tmp_path: Path, suffix: str) -> None:
    import yaml

    path = tmp_path / f"cfg{suffix}"
    path.write_text(json.dumps(EXAMPLE) if suffix == ".json" else yaml.safe_dump(EXAMPLE))
    cfg = CompressionConfig.load(path)
    assert CompressionConfig.from_dict(cfg.to_dict()).to_dict() == cfg.to_dict()
    assert cfg.to_dict()["layers"]["11"]["mlp"]["outlier_channels"] == [5, 9, 300]


@pytest.mark.parametrize(
    ("patch", "message"),
    [
        ({"default": "int4:g99999"}, "default: invalid codec spec 'int4:g99999'"),
        ({"algo": "ring"}, "algo 'ring'"),
        ({"min_bytes": -1}, "min_bytes must be an integer >= 0, got -1"),
        ({"version": 2}, "version 2 is not supported"),
        ({"colour": "blue"}, "unknown key(s) ['colour']"),
        ({"layers": {"x": {"mlp": "fp8"}}}, "layer key 'x' is not an integer"),
        ({"layers": {"3": {"moe": "fp8"}}}, "layer 3 has unknown block(s) ['moe']"),
        ({"layers": {"3": {"mlp": {"spec": "int4+outliers", "outlier_channels": [1, 1]}}}}, "channel 1 appears twice"),
        ({"layers": {"3": {"mlp": {"spec": "int4"}, "attention": 5}}}, "expected a spec string or a mapping"),
        ({"layers": {"3": {"mlp": "int4+outliers"}}}, "static channel table"),
        ({"layers": {"3": {"mlp": "int4@three-shot"}}}, "layer 3 mlp: algo 'three-shot' is not one of"),
        ({"layers": {"3": {"mlp": "none@two-shot"}}}, "an algorithm ('two-shot') only applies to a codec"),
        ({"layers": {"3": {"mlp": {"spec": "int4@two-shot"}}}}, "without '@ALGO' (use 'algo')"),
        ({"layers": {"3": {"mlp": {"spec": "int4", "algo": "ring"}}}}, "algo 'ring' is not one of"),
    ],
)
def test_bad_configs_name_the_problem(patch: dict, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        CompressionConfig.from_dict({**EXAMPLE, **patch}, source="cfg.json")
    assert message in str(info.value) and "cfg.json" in str(info.value)


def test_per_site_algorithm() -> None:
    layers = {
        "1": {"attention": "int6:g128+had@two-shot", "mlp": {"spec": "int5:g64", "algo": "one-shot"}},
        "2": {"mlp": {"spec": "int4+outliers", "outlier_channels": [3, 7], "algo": "two-shot"}},
    }
    cfg = CompressionConfig.from_dict({**EXAMPLE, "algo": "auto", "layers": layers})
    assert cfg.algo_for("attention", 1) == "two-shot" and cfg.setting_for("attention", 1).spec.startswith("int6")
    assert cfg.algo_for("mlp", 1) == "one-shot" and cfg.algo_for("mlp", 2) == "two-shot"
    assert cfg.algo_for("attention", 2) == "auto" and cfg.algo_for("embedding", None) == "auto"  # the config's
    assert cfg.codec_for("mlp", 2).channels.tolist() == [3, 7]
    # Written back in the same forms, and read again to the same config.
    out = cfg.to_dict()
    assert out["layers"]["1"]["attention"] == "int6:g128:sfp16+had:b32@two-shot"
    assert out["layers"]["2"]["mlp"] == {
        "spec": "int4:g32:sfp16+outliers",
        "outlier_channels": [3, 7],
        "algo": "two-shot",
    }
    assert CompressionConfig.from_dict(out).to_dict() == out
    # An explicit algorithm from outside replaces every site's.
    forced = cfg.with_algo("one-shot")
    assert {forced.algo_for(b, i) for i in (1, 2) for b in ("attention", "mlp")} == {"one-shot"}
    assert forced.codec_for("mlp", 2).channels.tolist() == [3, 7] and cfg.algo_for("mlp", 2) == "two-shot"
    with pytest.raises(ConfigError, match="algo 'ring'"):
        cfg.with_algo("ring")


def test_config_for_another_model_is_rejected() -> None:
    cfg = CompressionConfig.from_dict(EXAMPLE)
    cfg.check_model(num_layers=30, hidden_size=576, tp_size=3)
    with pytest.raises(ConfigError, match="config: compression config is for tp_size=3, but the model has tp_size=2"):
        cfg.check_model(num_layers=30, hidden_size=576, tp_size=2)
    with pytest.raises(ConfigError, match="num_layers=30, but the model has num_layers=24"):
        cfg.check_model(num_layers=24, hidden_size=576, tp_size=3)
    no_meta = CompressionConfig.from_dict({k: v for k, v in EXAMPLE.items() if k != "model"}, source="c.yaml")
    with pytest.raises(ConfigError, match="c.yaml: sets layer 29, but the model has num_layers=12"):
        no_meta.check_model(num_layers=12, hidden_size=576, tp_size=3)
    with pytest.raises(ConfigError, match="outlier channel 300 is out of range for the model's hidden_size=256"):
        no_meta.check_model(num_layers=30, hidden_size=256, tp_size=3)


def test_unreadable_and_malformed_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read compression config"):
        CompressionConfig.load(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text('{"default": "int4",')
    with pytest.raises(ConfigError, match="bad.json: not valid JSON"):
        CompressionConfig.load(bad)
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("default: [int4\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        CompressionConfig.load(bad_yaml)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-5, 40) | st.sampled_from(["int4", "fp8", "none", "zz", "mlp", "1"]),
    lambda children: (
        st.lists(children, max_size=3)
        | st.dictionaries(
            st.sampled_from(
                ["default", "layers", "mlp", "attention", "0", "3", "spec", "outlier_channels", "algo", "x"]
            ),
            children,
            max_size=4,
        )
    ),
    max_leaves=12,
)


@settings(max_examples=300, deadline=None)
@given(json_values)
def test_fuzz_returns_a_config_or_raises_config_error(data: object) -> None:
    try:
        cfg = CompressionConfig.from_dict(data)  # type: ignore[arg-type]
    except ConfigError:
        return
    assert isinstance(cfg, CompressionConfig)


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=200), st.sampled_from([".json", ".yaml"]))
def test_fuzz_malformed_files_raise_config_error_only(tmp_path_factory: pytest.TempPathFactory, text: str, suffix: str):
    path = tmp_path_factory.mktemp("fuzz") / f"layers{suffix}"
    path.write_text(text, encoding="utf-8")
    try:
        cfg = CompressionConfig.load(path)
    except ConfigError as exc:
        assert str(path) in str(exc)  # the message names the file
        return
    assert isinstance(cfg, CompressionConfig)


def test_channel_scale_tables() -> None:
    exps = [0] * 576
    exps[7] = -5
    site = {"spec": "int4:g64:se4m3+had+chscale", "channel_scale_exponents": exps, "algo": "two-shot"}
    cfg = CompressionConfig.from_dict({**EXAMPLE, "layers": {"3": {"mlp": site}}})
    codec = cfg.codec_for("mlp", 3)
    assert codec.exponents == exps and cfg.algo_for("mlp", 3) == "two-shot"
    out = cfg.to_dict()["layers"]["3"]["mlp"]
    assert out == {"spec": "int4:g64:se4m3+had:b32+chscale", "channel_scale_exponents": exps, "algo": "two-shot"}
    assert CompressionConfig.from_dict(cfg.to_dict()).to_dict() == cfg.to_dict()
    cfg.check_model(num_layers=30, hidden_size=576, tp_size=3)
    cfg.model = {}  # no recorded dimensions: the table itself is checked against the model
    with pytest.raises(ConfigError, match="576 channel scale exponents, but the model's hidden_size is 512"):
        cfg.check_model(num_layers=30, hidden_size=512, tp_size=3)
    for bad, message in [
        ({"spec": "int4+chscale"}, "needs the static per-channel scale exponents"),
        ({"spec": "int4", "channel_scale_exponents": exps}, "has no '+chscale' modifier"),
        ({"spec": "int4+chscale", "channel_scale_exponents": [99] * 576}, "exponent 99 is out of range"),
    ]:
        with pytest.raises(ConfigError) as info:
            CompressionConfig.from_dict({**EXAMPLE, "layers": {"3": {"mlp": bad}}}, source="cfg.json")
        assert message in str(info.value) and "cfg.json: layer 3 mlp" in str(info.value)


def test_a_setting_keeps_the_codec_its_validation_built() -> None:
    import dataclasses
    import pickle

    cfg = CompressionConfig.from_dict({"version": 1, "default": "int4:g32+had", "layers": {"0": {"mlp": "fp8"}}})
    setting = cfg.default
    codec = setting.codec()
    assert setting._codec is codec and cfg.codec_for("attention", 3) is codec  # built once, by validation
    again = CompressionConfig.from_dict(cfg.to_dict()).default
    assert again == setting and hash(again) == hash(setting) and again.codec() is not codec  # the cache is no key
    assert "_codec" not in repr(setting) and cfg.to_dict()["default"] == "int4:g32:sfp16+had:b32"
    assert pickle.loads(pickle.dumps(setting)) == setting
    other = dataclasses.replace(setting, spec="fp8-e4m3:b128:sfp32")
    assert other.codec().spec == "fp8-e4m3:b128:sfp32"  # replace() does not carry the old codec over
