"""``python -m fused_rnn``: the ``fused-rnn`` command (fused_rnn/app/cli.py)."""

import sys

from .app.cli import main

if __name__ == "__main__":
    sys.exit(main())
