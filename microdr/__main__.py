"""``python -m microdr`` and the ``microdr`` command's entry point.

Loading the command takes a moment (it imports torch); Ctrl-C meanwhile gets the one line and
the exit code that it gets later (:func:`microdr.cli._stopped_by`), not a traceback of imports.
"""

import os
import sys


def main() -> None:
    # torch.distributed's C++ side logs a lost rank or a missing rendezvous as stack traces; the
    # command says it in one line (microdr.optimize.distributed). torch reads this when it loads.
    os.environ.setdefault("TORCH_CPP_LOG_LEVEL", "FATAL")
    try:
        from microdr.cli import main as command
    except KeyboardInterrupt:
        sys.stderr.write("interrupted\n")
        sys.exit(130)  # 128 + SIGINT, as microdr.cli exits after Ctrl-C
    command()


if __name__ == "__main__":
    main()
