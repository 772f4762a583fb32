"""Codec throughput benchmark (same as `tpcomp bench codecs`)."""

from megatron_tpcomp.bench.codecs import main

if __name__ == "__main__":
    raise SystemExit(main())
