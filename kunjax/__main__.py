import sys

from kunjax.cli import main

sys.exit(main())
