"""`python -m server [flags]` = `marble serve [flags]`."""

import sys

from server.cli import main

sys.exit(main(["serve", *sys.argv[1:]]))
