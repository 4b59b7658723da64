import sys

from precision_policy.cli import main

sys.exit(main())
