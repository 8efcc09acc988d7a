"""`python -m data_tools.decontaminate`: see `data_tools.decontaminate.scan`."""

import sys

from data_tools.decontaminate.scan import main

sys.exit(main())
