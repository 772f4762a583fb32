"""Checkpoints: Hugging Face and GGUF sources, the tensor-parallel Megatron-Core checkpoint we write, resharding.

- :mod:`.hf`: Hugging Face Llama-family configs and safetensors, and the HF <-> Megatron tensor layout.
- :mod:`.gguf_source`: GGUF files (llama.cpp), dequantized, Q/K rows un-permuted, tokenizer rebuilt.
- :mod:`.store`: the checkpoint directory (atomic save, verified weights-only load, metadata).
- :mod:`.convert`: ``tpcomp convert`` (HF or GGUF -> Megatron at a TP size; Megatron -> another TP size or HF).
"""

from megatron_tpcomp.checkpoint.store import CheckpointError, CheckpointMeta, load_model, read_metadata

__all__ = ["CheckpointError", "CheckpointMeta", "load_model", "read_metadata"]
