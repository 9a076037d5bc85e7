"""`python -m treebatch` runs the command line."""

from treebatch.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
