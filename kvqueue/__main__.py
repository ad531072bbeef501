import sys

from kvqueue.cli import main

sys.exit(main())
