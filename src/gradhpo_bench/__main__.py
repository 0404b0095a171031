"""``python -m gradhpo_bench``: the ``gradhpo`` command."""

from gradhpo_bench.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
