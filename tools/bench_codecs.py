"""Codec throughput benchmark: a thin wrapper, same options as ``tpcomp bench codecs``.

    python tools/bench_codecs.py --reps 20 --json bench_codecs.json

From Python: ``megatron_tpcomp.bench.codec_speed.run(specs, sizes, dtype, reps) -> list[dict]``.
"""

from megatron_tpcomp.bench.codec_speed import main

if __name__ == "__main__":
    raise SystemExit(main())
