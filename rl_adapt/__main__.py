"""``python -m rl_adapt COMMAND ...``: the ``rl-adapt`` command line (the form ``torchrun`` launches)."""
import sys

from rl_adapt.cli import main

sys.exit(main())
