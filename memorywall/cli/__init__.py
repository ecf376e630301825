"""The `memorywall` command line: one module per subcommand, and the options they share.

`main` (the console script `memorywall`, and `python -m memorywall`) parses the
arguments and runs the chosen subcommand; every error a user can cause is one line
on stderr and exit 2.
"""

from memorywall.cli.app import build_parser, main

__all__ = ["build_parser", "main"]
