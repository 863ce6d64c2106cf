"""``python -m lightning_robust``: the same command as the ``lightning-robust`` console script."""

from lightning_robust.cli import main

if __name__ == "__main__":
    main()
