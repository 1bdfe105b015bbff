import sys

from moe_merge.cli import main

sys.exit(main())
