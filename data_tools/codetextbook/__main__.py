"""`python -m data_tools.codetextbook`: see `data_tools.codetextbook.pipeline`."""

import sys

from data_tools.codetextbook.pipeline import main

sys.exit(main())
