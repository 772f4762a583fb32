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

Files are read strictly: YAML anchors/aliases are refused (an alias bomb of 1 KB would expand to gigabytes), a
key may appear once per mapping (in a file, and as layer index: ``"3"`` and ``"03"`` are the same layer), unknown
keys are errors, ``model`` values are integers (``"30"`` is refused, not compared with 30), and the file size
(:data:`MAX_CONFIG_BYTES`) and number of entries (:data:`MAX_CONFIG_ENTRIES`) are bounded.
:meth:`CompressionConfig.check_against` checks a config against a checkpoint's metadata in the launching process.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from megatron_tpcomp.codecs import Codec, CodecError, make_codec
from megatron_tpcomp.collectives import ALGOS
from megatron_tpcomp.spec import canonical, parse_spec

BLOCKS = ("attention", "mlp")
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
#: Keys of the optional ``model`` entry (each a positive integer, compared with the model the config is used on).
MODEL_KEYS = ("num_layers", "hidden_size", "tp_size")
SITE_KEYS = ("spec", "outlier_channels", "channel_scale_exponents", "algo")
#: Largest config file read: the biggest real configs (a channel-scale table of one entry per hidden channel on
#: every site of a 70B-class model: 160 sites x 8192) are a few MB.
MAX_CONFIG_BYTES = 8 << 20
#: Most values (mapping entries and list items, nested, counted as written out) in one config: the same 70B-class
#: table is 1.3M.
MAX_CONFIG_ENTRIES = 2_000_000
#: The codec behind the bare spec ``auto``: the best 4.5-bit format measured on SmolLM2.
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
    #: The codec, built once (by validation, else by the first :meth:`codec`); not an argument, not compared,
    #: hashed, pickled or carried over by ``dataclasses.replace`` (a replaced setting builds its own).
    _codec: Codec | None = field(default=None, init=False, repr=False, compare=False)

    def codec(self) -> Codec:
        """The site's codec (built on first use and kept)."""
        if self._codec is None:
            codec = make_codec(
                self.spec,
                outlier_channels=list(self.outlier_channels) if self.outlier_channels else None,
                channel_scale_exponents=list(self.channel_scale_exponents) if self.channel_scale_exponents else None,
            )
            object.__setattr__(self, "_codec", codec)  # a cache: the dataclass is frozen for its settings
        return self._codec  # type: ignore[return-value]

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_codec": None}  # rebuilt where it is used: codecs hold per-device caches


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
    #: The file the config was read from (named in errors); not part of the config itself.
    source: str | None = field(default=None, repr=False, compare=False)
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
        """Validate a config mapping (see the module docstring); ``source`` (a file name) starts every error and
        is kept in :attr:`source` for later checks against a model."""
        if not isinstance(data, Mapping):
            raise ConfigError(f"{source}: top level must be a mapping, got {type(data).__name__}")
        n = _count_entries(data, MAX_CONFIG_ENTRIES)
        if n > MAX_CONFIG_ENTRIES:
            raise ConfigError(
                f"{source}: more than {MAX_CONFIG_ENTRIES} entries; expected a config of at most that many"
            )
        unknown = set(data) - TOP_LEVEL_KEYS
        if unknown:
            raise ConfigError(
                f"{source}: unknown key(s) {sorted(map(str, unknown))}; expected {sorted(TOP_LEVEL_KEYS)}"
            )
        version = data.get("version", 1)
        if not _is_int(version) or version != 1:
            raise ConfigError(f"{source}: version {version!r} is not supported; expected 1")
        algo = data.get("algo", "auto")
        if not isinstance(algo, str) or algo not in ALGOS:
            raise ConfigError(f"{source}: algo {algo!r} is not one of {', '.join(ALGOS)}")
        min_bytes = data.get("min_bytes", 0)
        if not _is_int(min_bytes) or min_bytes < 0:
            raise ConfigError(f"{source}: min_bytes must be an integer >= 0, got {min_bytes!r}")
        layers: dict[int, dict[str, SiteSetting]] = {}
        raw_layers = data.get("layers", {})
        if not isinstance(raw_layers, Mapping):
            raise ConfigError(f"{source}: 'layers' must be a mapping of layer index to settings")
        keys: dict[int, Any] = {}
        for key, blocks in raw_layers.items():
            index = _layer_index(key, source)
            if index in keys:
                raise ConfigError(
                    f"{source}: layer keys {keys[index]!r} and {key!r} both name layer {index}; expected one entry "
                    f"per layer"
                )
            keys[index] = key
            if not isinstance(blocks, Mapping):
                raise ConfigError(f"{source}: layer {index} must map 'attention'/'mlp' to settings")
            bad = set(blocks) - set(BLOCKS)
            if bad:
                raise ConfigError(
                    f"{source}: layer {index} has unknown block(s) {sorted(map(str, bad))}; expected {BLOCKS}"
                )
            layers[index] = {b: _setting(v, f"{source}: layer {index} {b}") for b, v in blocks.items()}
        model = data.get("model", {})
        if not isinstance(model, Mapping):
            raise ConfigError(f"{source}: 'model' must be a mapping with keys {list(MODEL_KEYS)}")
        bad_model = set(model) - set(MODEL_KEYS)
        if bad_model:
            raise ConfigError(
                f"{source}: unknown key(s) {sorted(map(str, bad_model))} in 'model'; expected {list(MODEL_KEYS)}"
            )
        for key, value in model.items():
            if not _is_int(value) or value < 1:
                kind = " (a string)" if isinstance(value, str) else ""
                raise ConfigError(f"{source}: model.{key} is {value!r}{kind}; expected an integer >= 1")
        policy = data.get("policy", "fixed")
        if not isinstance(policy, str) or policy not in POLICIES:
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
            source=source,
        )

    @classmethod
    def load(cls, path: str | Path) -> CompressionConfig:
        """Read a JSON (``.json``) or YAML (``.yaml``/``.yml``) config file: at most :data:`MAX_CONFIG_BYTES`,
        no duplicate keys, and for YAML no anchors or aliases."""
        path = Path(path)
        try:
            with open(path, "rb") as f:  # a bounded read: a FIFO or /dev/zero reports size 0 and never ends
                raw = f.read(MAX_CONFIG_BYTES + 1)
        except OSError as exc:
            raise ConfigError(f"cannot read compression config {path}: {exc.strerror}") from exc
        if len(raw) > MAX_CONFIG_BYTES:
            raise ConfigError(
                f"{path}: larger than {MAX_CONFIG_BYTES} bytes; expected a compression config of at most that size"
            )
        is_yaml = path.suffix.lower() in (".yaml", ".yml")
        try:
            text = raw.decode("utf-8")
            data = _load_yaml(text) if is_yaml else json.loads(text, object_pairs_hook=_unique_pairs)
        except ConfigError as exc:
            raise ConfigError(f"{path}: {exc}") from None
        except Exception as exc:  # json.JSONDecodeError, yaml.YAMLError, UnicodeDecodeError, RecursionError
            msg = " ".join(str(exc).split())  # YAML errors span lines; ours are one
            raise ConfigError(f"{path}: not valid {'YAML' if is_yaml else 'JSON'}: {msg}") from exc
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

    def check_model(self, num_layers: int, hidden_size: int, tp_size: int, *, target: str = "the model") -> None:
        """Raise ConfigError if this config was made for another model or TP size (the message names the config's
        file, the field, and both values; ``target`` says what the config is checked against)."""
        src = self.source or "compression config"
        expected = {"num_layers": num_layers, "hidden_size": hidden_size, "tp_size": tp_size}
        for key, value in expected.items():
            if key in self.model and self.model[key] != value:
                raise ConfigError(
                    f"{src}: compression config is for {key}={self.model[key]}, but {target} has {key}={value}"
                )
        for index, blocks in sorted(self.layers.items()):
            if index >= num_layers:
                raise ConfigError(f"{src}: sets layer {index}, but {target} has num_layers={num_layers}")
            for block, setting in blocks.items():
                if setting.outlier_channels and max(setting.outlier_channels) >= hidden_size:
                    raise ConfigError(
                        f"{src}: layer {index} {block}: outlier channel {max(setting.outlier_channels)} is out of "
                        f"range for {target}'s hidden_size={hidden_size}"
                    )
                scales = setting.channel_scale_exponents
                if scales and len(scales) != hidden_size:
                    raise ConfigError(
                        f"{src}: layer {index} {block}: {len(scales)} channel scale exponents, but {target}'s "
                        f"hidden_size is {hidden_size}; expected one per channel"
                    )

    def check_against(
        self,
        model: Any,
        *,
        tp_size: int | None = None,
        source: str | Path | None = None,
        target: str | None = None,
    ) -> None:
        """Check this config against a model before any rank starts (cheap: reads no weights).

        Args:
            model: a ``CheckpointMeta`` (``checkpoint.read_metadata(path)``), the
                metadata mapping (``{"model_config": ..., "tp_size": ...}``), a ``ModelConfig`` or Megatron
                ``TransformerConfig`` (anything with ``num_layers`` and ``hidden_size``), or a mapping with those keys.
            tp_size: the TP size the config will run at (default: the checkpoint's, or the object's
                ``tp_size``/``tensor_model_parallel_size``).
            source: the config file to name in errors (default: the file it was loaded from).
            target: how to name the model in errors (default: ``the checkpoint PATH`` or ``the model``).

        Raises:
            ConfigError: one line naming the config file, the field and both values.
        """
        if isinstance(model, (str, Path)):  # reading metadata is the checkpoint layer's job, above this one
            raise ConfigError(
                f"check_against takes a checkpoint's metadata, not its path {str(model)!r}: use "
                "config.check_against(megatron_tpcomp.checkpoint.read_metadata(path))"
            )
        if hasattr(model, "model_config") and hasattr(model, "path"):  # CheckpointMeta
            target = target or f"the checkpoint {model.path}"
            tp_size = model.tp_size if tp_size is None else tp_size
            model = model.model_config
        elif isinstance(model, Mapping) and "model_config" in model:
            target = target or "the checkpoint metadata"
            tp_size = model.get("tp_size") if tp_size is None else tp_size
            model = model["model_config"]

        def get(name: str, *alternatives: str) -> Any:
            for n in (name, *alternatives):
                value = model.get(n) if isinstance(model, Mapping) else getattr(model, n, None)
                if value is not None:
                    return value
            return None

        num_layers, hidden = get("num_layers"), get("hidden_size")
        tp = tp_size if tp_size is not None else get("tp_size", "tensor_model_parallel_size")
        what = target or "the model"
        for key, value in (("num_layers", num_layers), ("hidden_size", hidden), ("tp_size", tp)):
            if not _is_int(value) or value < 1:
                raise ConfigError(
                    f"cannot check {self.source or 'compression config'}: {what} has {key}={value!r}; expected an "
                    f"integer >= 1 (pass tp_size= with a model config)"
                )
        checked = self if source is None else dataclasses.replace(self, source=str(source))
        checked.check_model(num_layers, hidden, tp, target=what)

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
        bad = set(value) - set(SITE_KEYS)
        if bad or "spec" not in value:
            raise ConfigError(
                f"{where}: expected {{'spec': ..., 'outlier_channels': [...], 'channel_scale_exponents': [...], "
                f"'algo': ...}} (keys {list(SITE_KEYS)}), got keys {sorted(map(str, value))}"
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
    setting = SiteSetting(
        canonical(cs),
        tuple(int(c) for c in channels) if channels is not None else None,
        algo,
        tuple(codec.exponents) if exponents is not None else None,  # type: ignore[attr-defined]
    )
    object.__setattr__(setting, "_codec", codec)  # keep the codec validation built
    return setting


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _layer_index(key: Any, source: str) -> int:
    """A ``layers`` key as a layer index: a non-negative integer, or a string of ASCII digits (``int()`` alone
    would also take ``" 3"``, ``"3_0"``, ``"+3"``, ``True`` and non-ASCII digits)."""
    if _is_int(key) and key >= 0:
        return key
    if isinstance(key, str) and re.fullmatch(r"[0-9]{1,9}", key):
        return int(key)
    if _is_int(key):
        raise ConfigError(f"{source}: layer index {key} is negative")
    raise ConfigError(f"{source}: layer key {key!r} is not an integer index (expected digits 0-9)")


def _count_entries(data: Any, limit: int) -> int:
    """Values in ``data`` (mapping entries and list items, nested; a shared sub-object counts each time it appears,
    as it would when written out), counting stops just past ``limit`` so the walk itself is bounded."""
    count, stack = 0, [data]
    while stack and count <= limit:
        item = stack.pop()
        if isinstance(item, Mapping):
            count += len(item)
            stack.extend(item.values())
        elif isinstance(item, (list, tuple)):
            count += len(item)
            stack.extend(item)
    return count


def _unique_pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """``json.loads`` object hook: a key given twice in one object is an error (json keeps the last silently)."""
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ConfigError(f"key {key!r} appears twice in one object; expected each key once")
        out[key] = value
    return out


def _load_yaml(text: str) -> Any:
    """``yaml.safe_load`` without anchors/aliases (refused, naming the line) and without duplicate keys."""
    import yaml

    class StrictLoader(yaml.SafeLoader):
        def compose_node(self, parent: Any, index: Any) -> Any:
            event = self.peek_event()
            if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None) is not None:
                kind = "alias *" if isinstance(event, yaml.AliasEvent) else "anchor &"
                raise ConfigError(
                    f"line {event.start_mark.line + 1}: YAML {kind}{event.anchor} is not allowed in a compression "
                    f"config (aliases can expand a small file without bound); write the values out"
                )
            return super().compose_node(parent, index)

        def construct_mapping(self, node: Any, deep: bool = False) -> Any:
            seen: dict[Any, int] = {}
            for key_node, _ in node.value:
                key = self.construct_object(key_node, deep=True)
                try:
                    hash(key)
                except TypeError:
                    continue  # the base class reports unhashable keys
                line = key_node.start_mark.line + 1
                if key in seen:
                    raise ConfigError(f"line {line}: key {key!r} appears twice (first on line {seen[key]})")
                seen[key] = line
            return super().construct_mapping(node, deep=deep)

    return yaml.load(text, Loader=StrictLoader)  # noqa: S506 - StrictLoader is a SafeLoader
