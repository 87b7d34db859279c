"""`python -m simulators -c CONFIG [...]`: the same as `linectl simulate` (the whole line of a config)."""

import sys

from linectl.cli import main

sys.exit(main(["simulate", *sys.argv[1:]]))
