"""Prefix replay for the sensitivity pass: compressing one site leaves every layer before it bit-identical, so
their outputs from the uncompressed run are recorded once and replayed instead of recomputed (on average half
the cost of a sensitivity forward)."""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator, Sequence
from typing import Any

import torch


def record_outputs(layers: Sequence[torch.nn.Module]) -> tuple[list[torch.Tensor | None], list[Any]]:
    """Forward hooks that keep a copy of every layer's output hidden states; returns (slots, hook handles)."""
    slots: list[torch.Tensor | None] = [None] * len(layers)

    def hook(index: int, module: torch.nn.Module, args: Any, output: Any) -> None:
        slots[index] = (output[0] if isinstance(output, tuple) else output).detach().clone()

    handles = [layer.register_forward_hook(functools.partial(hook, i)) for i, layer in enumerate(layers)]
    return slots, handles


def _recorded_forward(output: torch.Tensor, *args: Any, **kwargs: Any) -> tuple[torch.Tensor, Any]:
    return output, kwargs.get("context")


@contextlib.contextmanager
def replay_prefix(layers: Sequence[torch.nn.Module], outputs: Sequence[torch.Tensor], start: int) -> Iterator[None]:
    """Within the block, layers ``0 .. start-1`` return their recorded ``outputs`` (megatron-core's
    TransformerLayer returns ``(hidden_states, context)``) instead of computing; later layers run normally."""
    for i in range(start):
        layers[i].forward = functools.partial(_recorded_forward, outputs[i])  # instance attribute: __call__ uses it
    try:
        yield
    finally:
        for i in range(start):
            del layers[i].forward
