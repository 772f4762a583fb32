"""megatron-tpcomp: compressed tensor-parallel communication for Megatron-Core inference.

Where things are:
- codecs (formats):            ``megatron_tpcomp/codecs/`` (``make_codec(spec)``), spec grammar in ``spec.py``
- compressed collectives:      ``megatron_tpcomp/collectives.py``
- CUDA kernels and backends:   ``kernels/`` (sources), ``megatron_tpcomp/kernels.py`` (loader, backend enum)
"""

from megatron_tpcomp.codecs import Codec, CodecError, make_codec
from megatron_tpcomp.spec import CodecSpec, describe_grammar, parse_spec

__version__ = "0.1.0"

__all__ = ["Codec", "CodecError", "CodecSpec", "describe_grammar", "make_codec", "parse_spec", "__version__"]
