import sys

from pyrovae.cli import main

sys.exit(main())
