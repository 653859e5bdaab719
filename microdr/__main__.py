"""``python -m microdr``: the ``microdr`` command."""

from microdr.cli import main

if __name__ == "__main__":
    main()
