"""``python -m megatron_tpcomp.megatron_lm SCRIPT.py [ARGS]``: see the package docstring."""

import sys

from megatron_tpcomp.megatron_lm import main
from megatron_tpcomp.rankwarnings import quiet_rank_warnings

quiet_rank_warnings()  # every rank runs this entry (torchrun): no missing-TE/apex notices per rank

sys.exit(main())
