"""The engine tests' shared setup."""

from __future__ import annotations

import sys
from pathlib import Path

# pytest runs with --import-mode=importlib: make scheduler_helpers importable by the tests here.
sys.path.insert(0, str(Path(__file__).parent))
