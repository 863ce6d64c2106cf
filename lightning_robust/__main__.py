"""``python -m lightning_robust``: the CLI, plus ``--version``."""

import sys

from lightning_robust import __version__


def _main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] in ("--version", "-V"):
        print(f"lightning-robust {__version__}")
        return
    from lightning_robust.cli import main

    main()


if __name__ == "__main__":
    _main()
