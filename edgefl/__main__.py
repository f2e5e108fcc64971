"""``python -m edgefl``: the same as the ``edgefl`` command."""

from __future__ import annotations

import sys

from edgefl.cli import main

sys.exit(main())
