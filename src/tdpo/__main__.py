"""``python -m tdpo``: the same command line as the ``tdpo`` script."""

from tdpo.cli import console_main

if __name__ == "__main__":
    console_main()
