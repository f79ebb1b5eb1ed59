import sys
from pathlib import Path

# The extension is not an installed package: the WebUI puts its folder on sys.path, and so do the tests.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
