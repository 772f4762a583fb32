"""Compression configs shipped with the package (read with :func:`importlib.resources.files`).

``smollm2-135m-tp3-kl0.0085.json``: per-layer codecs for SmolLM2-135M at TP=3 found by ``tpcomp calibrate
--search`` under a KL budget of 0.0085 (a copy of ``examples/configs/`` in the repository); ``tpcomp demo``
compares it with uncompressed and ``int4:g32+had``.
"""
