"""Speed benchmarks against peers (see `phi_bench/cli.py` for the sections and docs/benchmarks.md for the figures).

python launch/bench.py [quick=true] [only=[train,generate,kernels,data,tokenizer,sandbox]] [gpu=true] [markdown=true]
"""

import sys

from phi_bench.cli import main

if __name__ == "__main__":
    sys.exit(main())
