"""Subcommands of the rl-adapt CLI (one module each: register(subparsers), run(args))."""
