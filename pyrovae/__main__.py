import sys


def _exit(code: int):
    """End with ``code``, also after a Ctrl-C that was caught.

    Under ``python -m``, CPython ends the process by SIGINT after it has finished (exit status -2, not
    ours) when a KeyboardInterrupt ever left code run from a string, even one caught later: dataclasses
    builds each ``__init__`` that way, so an interrupt that lands while a library is imported sets the
    mark now and then. Running any string clears it."""
    exec("pass")
    sys.exit(code)


try:
    from pyrovae.cli import main
except KeyboardInterrupt:  # Ctrl-C in the first instant of start-up
    print("pyrovae: interrupted", file=sys.stderr)
    _exit(130)

_exit(main())
