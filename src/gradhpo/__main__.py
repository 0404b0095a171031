"""``python -m gradhpo``: the ``gradhpo`` command."""

from gradhpo.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
