"""Compression configs shipped with the package (read with :func:`importlib.resources.files`).

``smollm2-135m-tp3-kl0.006.json``: per-layer codecs for SmolLM2-135M at TP=3 found by ``tpcomp calibrate
--search`` under a KL budget of 0.006 (a copy of ``examples/configs/`` in the repository; it meets perplexity
<= +1%, KL <= 0.01 and top-1 >= 93% on two held-out domains, README "Results"); ``tpcomp demo`` compares it with
uncompressed and ``int4:g32+had``.
"""
