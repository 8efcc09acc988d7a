"""`make demo`: the whole phi-1 pipeline, small, on this machine (see `phi_train/demo.py` for the stages and sizes).

python launch/demo.py [--verbose]
"""

import sys

from phi_train.demo import main

if __name__ == "__main__":
    sys.exit(main())
