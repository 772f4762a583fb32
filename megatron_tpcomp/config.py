"""Compression config: which codec each layer's collectives use. One spec for all, or a per-layer file.

Schema (JSON or YAML; version 1)::

    {
      "version": 1,
      "default": "int4:g32+had",          # spec for every transformer-layer collective not listed below
      "embedding": "none",                # vocab-parallel embedding all-reduce (SP: reduce-scatter)
      "logits": "none",                   # LM-head: gather of logits / SP all-gather of its input
      "min_bytes": 0,                     # messages smaller than this go uncompressed
      "algo": "auto",                     # all-reduce algorithm: auto | one-shot | two-shot
      "policy": "fixed",                  # fixed: always the layer's codec; auto: per message, the fastest of
                                          #   the layer's codec (one-/two-shot) and uncompressed (cost model)
      "perf_table": "perf.json",          # policy auto: measured performance table (costmodel.py); optional
      "layers": {                         # 0-based layer index -> per-block settings
        "0":  {"attention": "fp8", "mlp": "int8:g32"},
        "11": {"mlp": {"spec": "int4:g32+outliers", "outlier_channels": [5, 9, 300]}},
        "12": {"mlp": {"spec": "int4:g64:se4m3+had+chscale",               # static per-channel scales 2^e,
               "channel_scale_exponents": [0, -2, 1, ...]}},              #   one per hidden channel
        "20": {"attention": "int6:g128+had@two-shot",                     # SPEC@ALGO: this site's all-reduce
               "mlp": {"spec": "int5:g64+had", "algo": "one-shot"}},     #   algorithm (overrides "algo")
        "29": {"mlp": "none"}
      },
      "model": {"num_layers": 30, "hidden_size": 576, "tp_size": 3}   # optional: checked against the model
    }

"attention" covers the collectives of a layer's self-attention block (sequence-parallel all-gather of its input,
all-reduce or reduce-scatter of the output projection); "mlp" the same for the MLP block (down projection).

A site's own algorithm (``SPEC@ALGO`` or the mapping's ``"algo"``) exists because the algorithm changes quality:
two-shot requantizes the reduced chunk (about twice the KL of one-shot) for a third fewer bytes at TP=3, so the
format search (:mod:`megatron_tpcomp.search`) chooses it per site. It applies to all-reduces only (gathers and
reduce-scatters have one algorithm). Overriding the algorithm from outside (``--tp-comm-compression-algo``,
``tpcomp eval --algo``) replaces every site's: :meth:`CompressionConfig.with_algo`.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from megatron_tpcomp.codecs import Codec, CodecError, make_codec
from megatron_tpcomp.collectives import ALGOS
from megatron_tpcomp.spec import canonical, parse_spec

BLOCKS = ("attention", "mlp")
SITES = BLOCKS + ("embedding", "logits")
TOP_LEVEL_KEYS = {
    "version",
    "default",
    "embedding",
    "logits",
    "min_bytes",
    "algo",
    "policy",
    "perf_table",
    "layers",
    "model",
    "meta",
}
POLICIES = ("fixed", "auto")
#: The codec behind the bare spec ``auto``: the best 4.5-bit format in FACTS.md's SmolLM2 table.
AUTO_DEFAULT_SPEC = "int4:g32+had"


class ConfigError(ValueError):
    """A compression config that cannot be used; the message names the bad key or value."""


@dataclass(frozen=True)
class SiteSetting:
    """Codec for one collective site: a spec, for ``+outliers`` the static channel table, for ``+chscale`` the
    static channel-scale exponents, and optionally the site's own all-reduce algorithm (None: the config's
    ``algo``)."""

    spec: str
    outlier_channels: tuple[int, ...] | None = None
    algo: str | None = None
    channel_scale_exponents: tuple[int, ...] | None = None

    def codec(self) -> Codec:
        return make_codec(
            self.spec,
            outlier_channels=list(self.outlier_channels) if self.outlier_channels else None,
            channel_scale_exponents=list(self.channel_scale_exponents) if self.channel_scale_exponents else None,
        )


@dataclass
class CompressionConfig:
    """Validated compression settings for a model. Build with :meth:`from_spec` or :meth:`load`."""

    default: SiteSetting = field(default_factory=lambda: SiteSetting("none"))
    embedding: SiteSetting = field(default_factory=lambda: SiteSetting("none"))
    logits: SiteSetting = field(default_factory=lambda: SiteSetting("none"))
    layers: dict[int, dict[str, SiteSetting]] = field(default_factory=dict)
    min_bytes: int = 0
    algo: str = "auto"
    model: dict[str, Any] = field(default_factory=dict)
    policy: str = "fixed"
    perf_table: str | None = None
    _codecs: dict[SiteSetting, Codec] = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def from_spec(cls, spec: str, *, min_bytes: int = 0, algo: str = "auto") -> CompressionConfig:
        """One spec for every transformer-layer collective; embedding and logits stay uncompressed.

        ``auto`` = :data:`AUTO_DEFAULT_SPEC` with policy ``auto`` (per message: that codec or uncompressed,
        whichever the cost model predicts faster)."""
        if spec.strip().lower() == "auto":
            cfg = cls.from_spec(AUTO_DEFAULT_SPEC, min_bytes=min_bytes, algo=algo)
            cfg.policy = "auto"
            return cfg
        setting = _setting(spec, "spec")
        if algo not in ALGOS:
            raise ConfigError(f"algo {algo!r} is not one of {', '.join(ALGOS)}")
        if min_bytes < 0:
            raise ConfigError(f"min_bytes must be >= 0, got {min_bytes}")
        return cls(default=setting, min_bytes=min_bytes, algo=algo)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: str = "config") -> CompressionConfig:
        if not isinstance(data, Mapping):
            raise ConfigError(f"{source}: top level must be a mapping, got {type(data).__name__}")
        unknown = set(data) - TOP_LEVEL_KEYS
        if unknown:
            raise ConfigError(f"{source}: unknown key(s) {sorted(unknown)}; expected {sorted(TOP_LEVEL_KEYS)}")
        version = data.get("version", 1)
        if version != 1:
            raise ConfigError(f"{source}: version {version!r} is not supported; expected 1")
        algo = data.get("algo", "auto")
        if algo not in ALGOS:
            raise ConfigError(f"{source}: algo {algo!r} is not one of {', '.join(ALGOS)}")
        min_bytes = data.get("min_bytes", 0)
        if not isinstance(min_bytes, int) or isinstance(min_bytes, bool) or min_bytes < 0:
            raise ConfigError(f"{source}: min_bytes must be an integer >= 0, got {min_bytes!r}")
        layers: dict[int, dict[str, SiteSetting]] = {}
        raw_layers = data.get("layers", {})
        if not isinstance(raw_layers, Mapping):
            raise ConfigError(f"{source}: 'layers' must be a mapping of layer index to settings")
        for key, blocks in raw_layers.items():
            try:
                index = int(key)
            except (TypeError, ValueError):
                raise ConfigError(f"{source}: layer key {key!r} is not an integer index") from None
            if index < 0:
                raise ConfigError(f"{source}: layer index {index} is negative")
            if not isinstance(blocks, Mapping):
                raise ConfigError(f"{source}: layer {index} must map 'attention'/'mlp' to settings")
            bad = set(blocks) - set(BLOCKS)
            if bad:
                raise ConfigError(f"{source}: layer {index} has unknown block(s) {sorted(bad)}; expected {BLOCKS}")
            layers[index] = {b: _setting(v, f"{source}: layer {index} {b}") for b, v in blocks.items()}
        model = data.get("model", {})
        if not isinstance(model, Mapping):
            raise ConfigError(f"{source}: 'model' must be a mapping")
        policy = data.get("policy", "fixed")
        if policy not in POLICIES:
            raise ConfigError(f"{source}: policy {policy!r} is not one of {', '.join(POLICIES)}")
        perf_table = data.get("perf_table")
        if perf_table is not None and not isinstance(perf_table, str):
            raise ConfigError(f"{source}: perf_table must be a file path, got {perf_table!r}")
        return cls(
            default=_setting(data.get("default", "none"), f"{source}: default"),
            embedding=_setting(data.get("embedding", "none"), f"{source}: embedding"),
            logits=_setting(data.get("logits", "none"), f"{source}: logits"),
            layers=layers,
            min_bytes=min_bytes,
            algo=algo,
            model=dict(model),
            policy=policy,
            perf_table=perf_table,
        )

    @classmethod
    def load(cls, path: str | Path) -> CompressionConfig:
        """Read a JSON (``.json``) or YAML (``.yaml``/``.yml``) config file."""
        path = Path(path)
        try:
            text = path.read_text()
        except OSError as exc:
            raise ConfigError(f"cannot read compression config {path}: {exc.strerror}") from exc
        try:
            if path.suffix.lower() in (".yaml", ".yml"):
                import yaml

                data = yaml.safe_load(text)
            else:
                data = json.loads(text)
        except Exception as exc:  # json.JSONDecodeError, yaml.YAMLError
            raise ConfigError(
                f"{path}: not valid {'YAML' if path.suffix in ('.yaml', '.yml') else 'JSON'}: {exc}"
            ) from exc
        return cls.from_dict(data, source=str(path))

    def to_dict(self) -> dict[str, Any]:
        def out(s: SiteSetting) -> Any:
            if s.outlier_channels or s.channel_scale_exponents:
                value: dict[str, Any] = {"spec": s.spec}
                if s.outlier_channels:
                    value["outlier_channels"] = list(s.outlier_channels)
                if s.channel_scale_exponents:
                    value["channel_scale_exponents"] = list(s.channel_scale_exponents)
                return value | ({"algo": s.algo} if s.algo else {})
            return f"{s.spec}@{s.algo}" if s.algo else s.spec

        return {
            "version": 1,
            "default": out(self.default),
            "embedding": out(self.embedding),
            "logits": out(self.logits),
            "min_bytes": self.min_bytes,
            "algo": self.algo,
            "policy": self.policy,
            "perf_table": self.perf_table,
            "layers": {str(i): {b: out(s) for b, s in blocks.items()} for i, blocks in sorted(self.layers.items())},
            "model": dict(self.model),
        }

    def setting_for(self, site: str, layer: int | None) -> SiteSetting:
        """The setting of collective site ``site`` (attention | mlp | embedding | logits) in ``layer``."""
        if site == "embedding":
            return self.embedding
        if site == "logits":
            return self.logits
        return self.layers.get(layer, {}).get(site, self.default) if layer is not None else self.default

    def algo_for(self, site: str, layer: int | None) -> str:
        """The all-reduce algorithm of collective site ``site`` in ``layer``: its own, else the config's."""
        return self.setting_for(site, layer).algo or self.algo

    def with_algo(self, algo: str) -> CompressionConfig:
        """A copy in which every site uses all-reduce algorithm ``algo`` (per-site choices dropped)."""
        if algo not in ALGOS:
            raise ConfigError(f"algo {algo!r} is not one of {', '.join(ALGOS)}")

        def plain(s: SiteSetting) -> SiteSetting:
            return dataclasses.replace(s, algo=None)

        return dataclasses.replace(
            self,
            default=plain(self.default),
            embedding=plain(self.embedding),
            logits=plain(self.logits),
            layers={i: {b: plain(s) for b, s in blocks.items()} for i, blocks in self.layers.items()},
            algo=algo,
            model=dict(self.model),
            _codecs={},
        )

    def codec_for(self, site: str, layer: int | None) -> Codec | None:
        """The codec to use, or None for the stock (uncompressed) collective."""
        setting = self.setting_for(site, layer)
        if setting.spec == "none":
            return None
        codec = self._codecs.get(setting)
        if codec is None:
            codec = self._codecs[setting] = setting.codec()
        return codec

    def check_model(self, num_layers: int, hidden_size: int, tp_size: int) -> None:
        """Raise ConfigError if this config was made for another model or TP size."""
        expected = {"num_layers": num_layers, "hidden_size": hidden_size, "tp_size": tp_size}
        for key, value in expected.items():
            if key in self.model and self.model[key] != value:
                raise ConfigError(f"compression config is for {key}={self.model[key]}, but the model has {value}")
        for index, blocks in self.layers.items():
            if index >= num_layers:
                raise ConfigError(f"compression config sets layer {index}, but the model has {num_layers} layers")
            for block, setting in blocks.items():
                if setting.outlier_channels and max(setting.outlier_channels) >= hidden_size:
                    raise ConfigError(
                        f"layer {index} {block}: outlier channel {max(setting.outlier_channels)} is out of range "
                        f"for hidden size {hidden_size}"
                    )
                scales = setting.channel_scale_exponents
                if scales and len(scales) != hidden_size:
                    raise ConfigError(
                        f"layer {index} {block}: {len(scales)} channel scale exponents, but the model's hidden "
                        f"size is {hidden_size}; expected one per channel"
                    )

    def describe(self) -> str:
        """Stable one-line summary (also used to check that ranks agree)."""
        return json.dumps(self.to_dict(), sort_keys=True)


def _setting(value: Any, where: str) -> SiteSetting:
    """A site's value: ``"SPEC"``, ``"SPEC@ALGO"`` or ``{"spec": ..., "outlier_channels": [...], "algo": ...}``."""
    algo: Any = None
    exponents: Any = None
    if isinstance(value, str):
        spec, channels = value, None
        if "@" in value:
            spec, _, algo = value.partition("@")
    elif isinstance(value, Mapping):
        bad = set(value) - {"spec", "outlier_channels", "channel_scale_exponents", "algo"}
        if bad or "spec" not in value:
            raise ConfigError(
                f"{where}: expected {{'spec': ..., 'outlier_channels': [...], 'channel_scale_exponents': [...], "
                f"'algo': ...}}, got keys {sorted(value)}"
            )
        spec, channels, algo = value["spec"], value.get("outlier_channels"), value.get("algo")
        exponents = value.get("channel_scale_exponents")
        if not isinstance(spec, str) or "@" in spec:
            raise ConfigError(f"{where}: 'spec' must be a spec string without '@ALGO' (use 'algo'), got {spec!r}")
    else:
        raise ConfigError(f"{where}: expected a spec string or a mapping, got {type(value).__name__}")
    if algo is not None and algo not in ALGOS:
        raise ConfigError(f"{where}: algo {algo!r} is not one of {', '.join(ALGOS)}")
    try:
        cs = parse_spec(spec)
        codec = make_codec(cs, outlier_channels=channels, channel_scale_exponents=exponents)  # validates the tables
    except CodecError as exc:
        raise ConfigError(f"{where}: {exc}") from exc
    if algo is not None and cs.kind == "none":
        raise ConfigError(f"{where}: 'none' sends uncompressed; an algorithm ({algo!r}) only applies to a codec")
    return SiteSetting(
        canonical(cs),
        tuple(int(c) for c in channels) if channels is not None else None,
        algo,
        tuple(codec.exponents) if exponents is not None else None,  # type: ignore[attr-defined]
    )
