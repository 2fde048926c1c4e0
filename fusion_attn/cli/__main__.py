"""`python -m fusion_attn.cli`: the same as the `fusion-attn` console script."""

import sys

from . import main

sys.exit(main())
