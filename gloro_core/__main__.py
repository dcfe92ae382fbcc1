"""``python -m gloro_core COMMAND``: see gloro_core.cli."""
import sys

from .cli import main

sys.exit(main())
