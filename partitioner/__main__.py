"""`python -m partitioner ...`: the command line (partitioner/cli.py)."""

from partitioner.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
