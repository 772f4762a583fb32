"""Where a TP collective comes from: a :class:`Site` and its text form ``layerN.BLOCK`` (or ``embedding``,
``logits``), as used in telemetry, calibration statistics and the format search's assignments.

Kept apart from :mod:`.intercept` (which owns the hooks that put sites on the stack) so pure-Python code can
build and parse site names without importing torch.distributed or megatron-core."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

#: The blocks of a transformer layer that own a forward TP collective (row-parallel output projections).
LAYER_BLOCKS = ("attention", "mlp")
#: Sites outside the transformer layers.
MODEL_SITES = ("embedding", "logits")


@dataclass(frozen=True)
class Site:
    """Where a collective comes from: ``kind`` in attention | mlp | embedding | logits, 0-based ``layer``."""

    kind: str
    layer: int | None = None

    def __str__(self) -> str:
        return self.kind if self.layer is None else f"layer{self.layer}.{self.kind}"

    @classmethod
    def parse(cls, text: str) -> Site:
        """Inverse of ``str()``: ``"layer3.mlp"`` -> ``Site("mlp", 3)``, ``"logits"`` -> ``Site("logits")``.

        Raises:
            ValueError: anything else (one line naming the text and the expected forms).
        """
        head, dot, block = text.partition(".")
        if not dot and text in MODEL_SITES:
            return cls(text)
        index = head[5:] if head.startswith("layer") else ""
        if dot and index.isdigit() and block in LAYER_BLOCKS:
            return cls(block, int(index))
        raise ValueError(
            f"site {text!r}: expected layerN.{'|'.join(LAYER_BLOCKS)} (N >= 0) or {' | '.join(MODEL_SITES)}"
        )

    @property
    def order(self) -> tuple[int, str]:
        """Sort key: model sites first, then by layer, then by block name."""
        return (-1 if self.layer is None else self.layer, self.kind)


def layer_sites(num_layers: int) -> Iterator[Site]:
    """The transformer-layer sites of a model of ``num_layers`` layers, in layer order (attention, then mlp)."""
    for layer in range(num_layers):
        for block in LAYER_BLOCKS:
            yield Site(block, layer)
