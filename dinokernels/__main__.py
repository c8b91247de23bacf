"""``python -m dinokernels <command>``: the command line lives in dinokernels/cli.py."""
import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
