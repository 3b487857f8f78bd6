"""`python -m marble.server [flags]` = `marble serve [flags]`."""

import sys

from marble.server.cli import main

sys.exit(main(["serve", *sys.argv[1:]]))
