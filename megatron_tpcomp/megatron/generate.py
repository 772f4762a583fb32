"""Greedy generation through megatron-core's static inference engine (legacy path), CPU or GPU.

Works with megatron-core 0.16 (``InferenceWrapperConfig``) and 0.19 (sizes from the context) inference APIs.
"""

from __future__ import annotations

import functools
import inspect
from typing import Any, Protocol

import torch

from megatron_tpcomp.megatron.compat import MegatronCompatError, megatron_version


class Tokenizer(Protocol):
    """What the text generation controller needs from a tokenizer."""

    eod: int
    bos: int | None

    def tokenize(self, text: str) -> list[int]: ...

    def detokenize(self, ids: list[int]) -> str: ...


class ByteTokenizer:
    """A tokenizer for random test models: bytes mapped into 1..127, EOD 0, no BOS (a prompt whose greedy
    continuation reaches EOD stops early, identically at every TP size)."""

    eod = 0
    bos = None
    vocab_size = 128

    def tokenize(self, text: str) -> list[int]:
        return [1 + b % 127 for b in text.encode()]

    def detokenize(self, ids: list[int]) -> str:
        return "".join(chr(i) for i in ids)

    def offsets(self, ids: list[int], text: str) -> list[int]:
        return list(range(len(ids)))


def _set_engine_progress(enabled: bool) -> None:
    from megatron.core.inference.engines import static_engine

    original = getattr(static_engine, "_tpcomp_original_tqdm", None) or getattr(static_engine, "tqdm", None)
    if original is None:
        return  # a release without the bar
    static_engine._tpcomp_original_tqdm = original
    static_engine.tqdm = original if enabled else functools.partial(original, disable=True)


def build_static_engine(
    model: torch.nn.Module,
    tokenizer: Tokenizer,
    *,
    vocab_size: int,
    max_batch: int = 4,
    max_seq_len: int = 256,
    dtype: torch.dtype = torch.float32,
    progress: bool = True,
) -> Any:
    """A ``StaticInferenceEngine`` (legacy static batching) around a megatron-core GPTModel.

    ``progress=False`` silences the engine's per-rank "static requests" progress bar (it draws one on every TP
    rank of this process).

    Up to 0.16 the GPT inference wrapper takes an ``InferenceWrapperConfig``; later releases (0.19.2 checked)
    dropped it and read the sizes from the model config and the inference context.
    """
    try:
        from megatron.core.inference.contexts import StaticInferenceContext
        from megatron.core.inference.engines.static_engine import StaticInferenceEngine
        from megatron.core.inference.model_inference_wrappers.gpt.gpt_inference_wrapper import GPTInferenceWrapper
        from megatron.core.inference.text_generation_controllers.text_generation_controller import (
            TextGenerationController,
        )
    except ImportError as exc:
        raise MegatronCompatError(
            f"megatron-core {megatron_version()}: the static inference engine is not importable ({exc})"
        ) from exc
    _set_engine_progress(progress)
    context = StaticInferenceContext(max_batch, max_seq_len)
    if "inference_wrapper_config" in inspect.signature(GPTInferenceWrapper.__init__).parameters:
        from megatron.core.inference.model_inference_wrappers.inference_wrapper_config import (
            InferenceWrapperConfig,
        )

        config = InferenceWrapperConfig(
            hidden_size=model.config.hidden_size,
            params_dtype=dtype,
            inference_batch_times_seqlen_threshold=-1,  # never split the batch into micro-batches
            padded_vocab_size=vocab_size,
            inference_max_seq_length=max_seq_len,
            inference_max_requests=max_batch,
        )
        wrapped = GPTInferenceWrapper(model, config, context)
    else:
        wrapped = GPTInferenceWrapper(model, context)
    controller = TextGenerationController(wrapped, tokenizer)
    return StaticInferenceEngine(controller, max_batch_size=max_batch, legacy=True)


def greedy_generate(engine: Any, prompts: list[str], num_tokens: int) -> list[list[int]]:
    """Generated token ids per prompt (greedy: top-k 1)."""
    from megatron.core.inference.sampling_params import SamplingParams

    params = SamplingParams(temperature=1.0, top_k=1, num_tokens_to_generate=num_tokens)
    results = engine.generate(prompts=prompts, sampling_params=params)
    return [[int(t) for t in r.generated_tokens] for r in results]
