"""``python -m deltainf``: the same command line as ``deltainf``."""
import sys

from deltainf.cli import main

sys.exit(main())
