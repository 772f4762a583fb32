"""Greedy generation through megatron-core's static inference engine (legacy path), CPU or GPU.

Built against megatron-core 0.16's inference API (``InferenceWrapperConfig``, ``GPTInferenceWrapper``,
``TextGenerationController``, ``StaticInferenceEngine(legacy=True)``). Later releases reorganised these modules;
:func:`build_static_engine` says so clearly instead of failing deep inside.
"""

from __future__ import annotations

import importlib
from typing import Any, Protocol

import torch

from megatron_tpcomp.megatron.compat import MegatronCompatError, megatron_version


class Tokenizer(Protocol):
    """What the text generation controller needs from a tokenizer."""

    eod: int
    bos: int | None

    def tokenize(self, text: str) -> list[int]: ...

    def detokenize(self, ids: list[int]) -> str: ...


def build_static_engine(
    model: torch.nn.Module,
    tokenizer: Tokenizer,
    *,
    vocab_size: int,
    max_batch: int = 4,
    max_seq_len: int = 256,
    dtype: torch.dtype = torch.float32,
) -> Any:
    """A ``StaticInferenceEngine`` (legacy static batching) around a megatron-core GPTModel."""
    try:
        wrapper_config_mod = importlib.import_module(
            "megatron.core.inference.model_inference_wrappers.inference_wrapper_config"
        )
        gpt_wrapper_mod = importlib.import_module(
            "megatron.core.inference.model_inference_wrappers.gpt.gpt_inference_wrapper"
        )
        controller_mod = importlib.import_module(
            "megatron.core.inference.text_generation_controllers.text_generation_controller"
        )
        engine_mod = importlib.import_module("megatron.core.inference.engines.static_engine")
        contexts = importlib.import_module("megatron.core.inference.contexts")
    except ImportError as exc:
        raise MegatronCompatError(
            f"megatron-core {megatron_version()}: the static inference engine API this module targets "
            f"(megatron-core 0.16) is not available ({exc})"
        ) from exc
    config = wrapper_config_mod.InferenceWrapperConfig(
        hidden_size=model.config.hidden_size,
        params_dtype=dtype,
        inference_batch_times_seqlen_threshold=-1,
        padded_vocab_size=vocab_size,
        inference_max_seq_length=max_seq_len,
        inference_max_requests=max_batch,
    )
    context = contexts.StaticInferenceContext(max_batch, max_seq_len)
    wrapped = gpt_wrapper_mod.GPTInferenceWrapper(model, config, context)
    controller = controller_mod.TextGenerationController(wrapped, tokenizer)
    return engine_mod.StaticInferenceEngine(controller, max_batch_size=max_batch, legacy=True)


def greedy_generate(engine: Any, prompts: list[str], num_tokens: int) -> list[list[int]]:
    """Generated token ids per prompt (greedy: top-k 1)."""
    from megatron.core.inference.sampling_params import SamplingParams

    params = SamplingParams(temperature=1.0, top_k=1, num_tokens_to_generate=num_tokens)
    results = engine.generate(prompts=prompts, sampling_params=params)
    return [[int(t) for t in r.generated_tokens] for r in results]
