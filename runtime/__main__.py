"""Entry point of the bundle executable (PyInstaller runs this file as a script)."""

import sys

from runtime.launch.main import main

if __name__ == "__main__":
    sys.exit(main())
