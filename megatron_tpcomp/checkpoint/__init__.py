"""Checkpoints: Hugging Face and GGUF sources, the tensor-parallel Megatron-Core checkpoint we write, resharding.

- :mod:`.hf`: Hugging Face Llama-family configs and safetensors, and the HF <-> Megatron tensor layout.
- :mod:`.gguf_source`: GGUF files (llama.cpp), dequantized, Q/K rows un-permuted, tokenizer rebuilt.
- :mod:`.store`: the checkpoint directory (atomic save, verified weights-only load); :mod:`.metadata` its
  ``tpcomp_checkpoint.json`` and the checks; :mod:`.directories` writing a directory atomically.
- :mod:`.torch_dist`: Megatron-LM's ``torch_dist`` checkpoints (read, load at any TP size, write);
  :mod:`.locate` tells the kinds of directory apart, :mod:`.megatron_args` maps our metadata to Megatron-LM flags.
- :mod:`.convert`: conversion (HF or GGUF -> Megatron at a TP size; Megatron -> another TP size or HF);
  :mod:`.export`: any source -> ``torch_dist``; :mod:`.loader`: :func:`load_model` for either format.

The command lines of ``tpcomp convert`` and ``tpcomp megatron-args`` are ``megatron_tpcomp/checkpoint_cli.py``.
"""

from megatron_tpcomp.checkpoint.errors import CheckpointError
from megatron_tpcomp.checkpoint.loader import load_model
from megatron_tpcomp.checkpoint.metadata import CheckpointMeta, read_metadata

__all__ = ["CheckpointError", "CheckpointMeta", "load_model", "read_metadata"]
