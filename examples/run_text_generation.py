"""Megatron-Core text generation with compressed TP communication; start it with torchrun.

    # CPU, 3 local gloo ranks, the embedded SmolLM2-135M (tpcomp convert smollm2-135m ckpt-tp3 --tp 3)
    torchrun --nproc-per-node 3 examples/run_text_generation.py --load ckpt-tp3 \\
        --tensor-model-parallel-size 3 --tp-comm-compression int4:g32+had \\
        --prompts "The state of our union is" --num-tokens-to-generate 32 --output-path out.jsonl

The same launcher is installed with the package: `torchrun ... -m megatron_tpcomp.textgen ...`, or
`tpcomp generate ...` (starts the local ranks itself). `--help` lists every option; the logic lives in
megatron_tpcomp/textgen.py.
"""

from megatron_tpcomp.textgen import main

if __name__ == "__main__":
    raise SystemExit(main())
