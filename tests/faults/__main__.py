"""`python -m tests.faults` (what `make faults` runs): see tests/faults/harness.py."""

import sys

from tests.faults.harness import main

sys.exit(main())
