"""The two steps every cached build piece shares: fetch a source distribution from PyPI, and
put a finished tree in its cache folder so that it is either whole or absent."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

COMPLETE = ".complete"


def fetch_sdist(requirement: str, dest: Path, pattern: str) -> Path:
    """pip download of requirement's source distribution into dest; returns the file
    (pattern: its glob, e.g. "llama_cpp_python-*.tar.gz")."""
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "-q",
                    requirement, "-d", str(dest)], check=True)
    return next(dest.glob(pattern))


def publish(tree: Path, folder: Path) -> Path:
    """Mark tree complete and move it to folder (an incomplete older one is replaced)."""
    (tree / COMPLETE).write_text("")
    if folder.exists():
        shutil.rmtree(folder)
    os.replace(tree, folder)
    return folder
