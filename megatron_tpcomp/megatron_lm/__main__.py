"""``python -m megatron_tpcomp.megatron_lm SCRIPT.py [ARGS]``: see the package docstring."""

import sys

from megatron_tpcomp.megatron_lm import main

sys.exit(main())
