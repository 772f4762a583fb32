"""The Megatron-Core plug-in: what changes Megatron's behaviour lives here.

- ``intercept.py`` (and ``te.py`` for Transformer Engine's layers): the interception of the TP collectives;
- ``args.py``: the ``--tp-comm-compression`` flags and turning them into a config;
- ``model.py``, ``cpu.py``, ``compat.py``, ``generate.py``: building a GPT model from a checkpoint, running
  megatron-core on CPU, version differences, greedy generation.

Other modules import megatron-core too, only to use it: ``megatron_lm/`` (the zero-edit Megatron-LM launch),
``checkpoint/`` (Megatron's torch_dist format), and the tools (evaluation, search, benchmarks) for parallel state.
"""
