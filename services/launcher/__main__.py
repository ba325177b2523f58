"""`python -m services.launcher up` starts the local mesh (what `make up` runs)."""

import sys

from services.launcher.cli import main

sys.exit(main())
