"""Quality evaluation: a thin wrapper, same options as ``tpcomp eval``.

    python tools/evaluate.py --tp 3 --specs none,fp8,int4:g32 --tokens 20480 --json eval.json

From Python: ``megatron_tpcomp.evaluation.evaluate(model, tp, specs, tokens=...) -> dict``.
"""

from megatron_tpcomp.evaluation import main

if __name__ == "__main__":
    raise SystemExit(main())
