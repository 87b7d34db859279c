import sys

from linectl.cli import main

sys.exit(main())
