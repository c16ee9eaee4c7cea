"""`python -m fwpzoo ...` is the `fwpzoo` command."""

import sys

from fwpzoo.cli import main

sys.exit(main())
