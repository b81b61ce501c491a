"""`python -m weights2data`: the `w2d` command."""

import sys

from weights2data.cli import main

sys.exit(main())
