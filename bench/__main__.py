"""``python -m bench``: the entry point ``make bench`` uses."""

from bench._harness import main

if __name__ == "__main__":
    raise SystemExit(main())
