"""The steps cached build pieces share: fetch a source distribution from PyPI, change its text
in a few exact places, and put a finished tree in its cache folder so that it is either whole
or absent."""

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
    """Mark tree complete and move it to folder (an incomplete older one is replaced). When
    another build (`make -j`) published the same piece first, its folder is kept and tree
    dropped: the folders are keyed by what they are made of."""
    (tree / COMPLETE).write_text("")
    if (folder / COMPLETE).exists():
        shutil.rmtree(tree)
        return folder
    if folder.exists():
        shutil.rmtree(folder)
    try:
        os.replace(tree, folder)
    except OSError:
        if not (folder / COMPLETE).exists():
            raise
        shutil.rmtree(tree)  # published by another build between the check and here
    return folder


def apply_patches(src: Path, patches, where: str) -> None:
    """patches: (file under src, text, what it becomes). Each text must be there exactly once: an
    upstream change that moves one stops the build (naming `where` to update) instead of
    silently dropping the change."""
    for rel, old, new in patches:
        path = src / rel
        text = path.read_text()
        if text.count(old) != 1:
            sys.exit(f"{rel} of this source no longer has the text a change expects; update {where}")
        path.write_text(text.replace(old, new))
