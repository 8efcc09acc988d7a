"""Serve a checkpoint behind an OpenAI-compatible HTTP API (see `phi_train/serve.py`).

python launch/serve.py checkpoint=runs/.../checkpoints [host=127.0.0.1 port=8000]
"""

import sys

from phi_train.serve import main

if __name__ == "__main__":
    sys.exit(main())
