"""Reliability: compression configs that cannot exhaust memory, be quietly misread, or fail late.

Findings (each test failed on the code before its fix):

- A 1 KB YAML alias bomb passed validation and exhausted memory in ``CompressionConfig.describe()``: anchors and
  aliases are now refused while the file is parsed (naming the line), and size and entry count are bounded.
- Duplicate layer keys (``"3"``/``"03"``, or one key twice in a file) were resolved as "last wins"; a misspelt
  ``model`` key was ignored; ``"num_layers": "30"`` (a string) produced "config is for num_layers=30, but the model
  has 30". All are errors now.
- A config for another model was caught only inside the ranks: ``CompressionConfig.check_against`` checks it
  against a checkpoint's metadata in the launching process, in one line naming the config file, the field and both
  values.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from megatron_tpcomp.config import CompressionConfig, ConfigError

REPO = Path(__file__).resolve().parents[2]

#: Nine levels of ten aliases each: 10^9 zeros when expanded, 1 KB on disk.
ALIAS_BOMB = """version: 1
default: int4:g32
model:
  l0: &l0 [0, 0, 0, 0, 0, 0, 0, 0, 0, 0]
  l1: &l1 [*l0, *l0, *l0, *l0, *l0, *l0, *l0, *l0, *l0, *l0]
  l2: &l2 [*l1, *l1, *l1, *l1, *l1, *l1, *l1, *l1, *l1, *l1]
  l3: &l3 [*l2, *l2, *l2, *l2, *l2, *l2, *l2, *l2, *l2, *l2]
  l4: &l4 [*l3, *l3, *l3, *l3, *l3, *l3, *l3, *l3, *l3, *l3]
  l5: &l5 [*l4, *l4, *l4, *l4, *l4, *l4, *l4, *l4, *l4, *l4]
  l6: &l6 [*l5, *l5, *l5, *l5, *l5, *l5, *l5, *l5, *l5, *l5]
  l7: &l7 [*l6, *l6, *l6, *l6, *l6, *l6, *l6, *l6, *l6, *l6]
  l8: &l8 [*l7, *l7, *l7, *l7, *l7, *l7, *l7, *l7, *l7, *l7]
"""


def _message(exc: pytest.ExceptionInfo) -> str:
    msg = str(exc.value)
    assert "\n" not in msg, msg  # one line
    return msg


def test_yaml_alias_bomb_is_refused_while_parsing(tmp_path: Path) -> None:
    path = tmp_path / "bomb.yaml"
    path.write_text(ALIAS_BOMB)
    assert path.stat().st_size < 1024
    t0 = time.monotonic()
    with pytest.raises(ConfigError) as info:
        CompressionConfig.load(path)  # the old loader returned; describe() then tried to write 10^9 values out
    assert f"{path}: line 4: YAML anchor &l0 is not allowed" in _message(info)
    assert time.monotonic() - t0 < 5
    # Merge keys need aliases too: refused the same way, naming the alias's line.
    merged = tmp_path / "merged.yaml"
    merged.write_text("meta: &m {note: a}\nlayers:\n  '0': {<<: *m}\n")
    with pytest.raises(ConfigError, match=r"merged\.yaml: line 1: YAML anchor &m is not allowed"):
        CompressionConfig.load(merged)


def test_size_and_entry_count_are_bounded(tmp_path: Path) -> None:
    big = tmp_path / "big.json"
    big.write_text(json.dumps({"default": "int4", "meta": {"pad": "x" * (9 << 20)}}))
    with pytest.raises(ConfigError) as info:
        CompressionConfig.load(big)
    assert f"{big}: larger than {8 << 20} bytes" in _message(info)
    # Through the Python API, shared sub-lists make a small object that writes out as 3 million values.
    row = [0] * 1000
    with pytest.raises(ConfigError) as info:
        CompressionConfig.from_dict({"default": "int4", "meta": {"rows": [row] * 3000}}, source="api.json")
    assert "api.json: more than 2000000 entries" in _message(info)


def test_duplicate_layer_keys_are_errors_naming_both(tmp_path: Path) -> None:
    layers = {"3": {"mlp": "int8:g32"}, "03": {"mlp": "fp8"}}
    with pytest.raises(ConfigError) as info:
        CompressionConfig.from_dict({"default": "int4", "layers": layers}, source="cfg.json")
    assert "cfg.json: layer keys '3' and '03' both name layer 3" in _message(info)
    with pytest.raises(ConfigError, match="layer keys 3 and '3' both name layer 3"):
        CompressionConfig.from_dict({"layers": {3: {"mlp": "fp8"}, "3": {"mlp": "fp8"}}})
    # One key twice in a file: json and PyYAML keep the last one silently; we do not.
    text = '{"default": "int4", "layers": {"3": {"mlp": "fp8"}, "3": {"mlp": "none"}}}'
    (tmp_path / "dup.json").write_text(text)
    with pytest.raises(ConfigError) as info:
        CompressionConfig.load(tmp_path / "dup.json")
    assert "dup.json: key '3' appears twice in one object" in _message(info)
    (tmp_path / "dup.yaml").write_text("default: int4\nlayers:\n  '3': {mlp: fp8}\n  '3': {mlp: none}\n")
    with pytest.raises(ConfigError) as info:
        CompressionConfig.load(tmp_path / "dup.yaml")
    assert "dup.yaml: line 4: key '3' appears twice (first on line 3)" in _message(info)
    (tmp_path / "dup2.yaml").write_text("default: int4\ndefault: fp8\n")
    with pytest.raises(ConfigError, match="line 2: key 'default' appears twice"):
        CompressionConfig.load(tmp_path / "dup2.yaml")


@pytest.mark.parametrize(
    ("patch", "message"),
    [
        ({"model": {"num_layer": 30}}, "unknown key(s) ['num_layer'] in 'model'; expected ['num_layers', 'hidden"),
        ({"model": {"num_layers": "30"}}, "model.num_layers is '30' (a string); expected an integer >= 1"),
        ({"model": {"tp_size": 3.0}}, "model.tp_size is 3.0; expected an integer >= 1"),
        ({"model": {"hidden_size": True}}, "model.hidden_size is True; expected an integer >= 1"),
        ({"version": True}, "version True is not supported"),
        ({"layers": {"3_0": {"mlp": "fp8"}}}, "layer key '3_0' is not an integer index"),  # int('3_0') == 30
        ({"layers": {" 3": {"mlp": "fp8"}}}, "layer key ' 3' is not an integer index"),
        ({"layers": {True: {"mlp": "fp8"}}}, "layer key True is not an integer index"),
        ({"layers": {"3": {"mlp": {"spec": "int4", "algorithm": "one-shot"}}}}, "(keys ['spec', 'outlier_channels'"),
    ],
    ids=lambda v: v if isinstance(v, str) else "",
)
def test_misspelt_and_mistyped_keys_are_errors_listing_the_valid_ones(patch: dict, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        CompressionConfig.from_dict({"default": "int4", **patch}, source="cfg.yaml")
    msg = _message(info)
    assert message in msg and msg.startswith("cfg.yaml: "), msg


def test_a_config_for_another_model_is_caught_before_any_rank_starts(real_ckpt: Path, tmp_path: Path) -> None:
    from megatron_tpcomp.checkpoint import read_metadata

    meta = read_metadata(real_ckpt)
    path = tmp_path / "for-smollm2-360m.json"
    path.write_text(json.dumps({"default": "int4:g32", "model": {"num_layers": 32, "hidden_size": 960}}))
    cfg = CompressionConfig.load(path)
    t0 = time.monotonic()
    for target, named in [
        (read_metadata(str(real_ckpt)), f"the checkpoint {real_ckpt}"),
        (meta, f"the checkpoint {real_ckpt}"),
        (meta.to_json(), "the checkpoint metadata"),
    ]:
        with pytest.raises(ConfigError) as info:
            cfg.check_against(target)
        assert _message(info) == f"{path}: compression config is for num_layers=32, but {named} has num_layers=30"
    assert time.monotonic() - t0 < 5  # it was 16-18 s, inside the ranks, as a 106-line traceback
    # Layers beyond the model and the TP size are checked too; a ModelConfig needs the TP size given.
    beyond = CompressionConfig.from_dict({"layers": {"30": {"mlp": "fp8"}}}, source="beyond.yaml")
    with pytest.raises(ConfigError, match=r"^beyond\.yaml: sets layer 30, but the checkpoint .* has num_layers=30$"):
        beyond.check_against(meta)
    tp2 = CompressionConfig.from_dict({"default": "int4", "model": {"tp_size": 2}}, source="tp2.json")
    with pytest.raises(ConfigError, match=r"^tp2\.json: compression config is for tp_size=2, but .* has tp_size=3$"):
        tp2.check_against(meta)
    tp2.check_against(meta.model_config, tp_size=2)
    with pytest.raises(ConfigError, match="cannot check tp2.json: the model has tp_size=None"):
        tp2.check_against(meta.model_config)
    # The shipped configs for this model pass, and naming another source changes only the message.
    for shipped in sorted((REPO / "examples" / "configs").glob("smollm2-135m-tp3-*.json")):
        CompressionConfig.load(shipped).check_against(meta)
    with pytest.raises(ConfigError, match=r"^renamed\.json: "):
        cfg.check_against(meta, source="renamed.json")
    # A path is refused with the call to make (the config layer does not read checkpoints).
    with pytest.raises(ConfigError, match=r"not its path .*read_metadata\(path\)"):
        cfg.check_against(real_ckpt)
