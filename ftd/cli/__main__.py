"""``python -m ftd.cli``: how ftd starts its own daemons and agents."""
import sys

from ftd.cli.main import main

sys.exit(main())
