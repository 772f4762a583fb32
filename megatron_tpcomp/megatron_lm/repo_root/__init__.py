"""Stand-ins for the modules at the root of a Megatron-LM checkout that its inference scripts import by bare name
(``model_provider``, ``gpt_builders``, ``mamba_builders``, ``pretrain_gpt``, ``pretrain_mamba``).

Megatron-LM's source archives of ``megatron/`` and ``examples/`` alone lack them. ``python -m
megatron_tpcomp.megatron_lm`` appends this directory to the END of ``sys.path`` only when no ``model_provider``
module is importable, so a real checkout's own files always win. What they build: a megatron-core GPTModel from
Megatron-LM's parsed arguments, with the local or Transformer Engine layer spec; anything else (MoE, Mamba, MTP,
legacy models, custom specs) is an error that says to use a full Megatron-LM checkout.
"""
