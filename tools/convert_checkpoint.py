"""Checkpoint converter: a thin wrapper, same options as ``tpcomp convert``.

    python tools/convert_checkpoint.py smollm2-135m ckpt-tp3 --tp 3
    python tools/convert_checkpoint.py /models/Llama-3.2-1B ckpt-tp2 --tp 2
    python tools/convert_checkpoint.py ckpt-tp3 ckpt-tp1 --tp 1          # reshard
    python tools/convert_checkpoint.py ckpt-tp3 hf-out --to hf          # back to Hugging Face format

From Python: ``megatron_tpcomp.checkpoint.convert.convert(source, output, tp_size)``.
"""

from megatron_tpcomp.checkpoint_cli import main

if __name__ == "__main__":
    raise SystemExit(main())
