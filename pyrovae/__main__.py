import sys

try:
    from pyrovae.cli import main
except KeyboardInterrupt:  # Ctrl-C in the first instant of start-up
    print("pyrovae: interrupted", file=sys.stderr)
    sys.exit(130)

sys.exit(main())
