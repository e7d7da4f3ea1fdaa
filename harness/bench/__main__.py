"""``python -m timesformer_harness.bench``: see ``timesformer_harness.bench.cli``."""

import sys

from timesformer_harness.bench.cli import main

sys.exit(main())
