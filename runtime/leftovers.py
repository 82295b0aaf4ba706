"""Removes PyInstaller temp folders (_MEI*) left behind by bundles that were killed.

PyInstaller's one-file bootloader unpacks its archive into a fresh _MEIxxxxxx folder at every
launch and deletes it on a normal exit, but a SIGKILLed or crashed launch leaves it: the
"temp folder filling the disk" complaint against one-file tools. Each running bundle holds a
lock on a marker file in its own folder; a folder whose marker is not locked belongs to a
bundle that is gone, and the next launch removes it. Folders without our marker (other
PyInstaller programs) are never touched.
"""

from __future__ import annotations

import os
import shutil
import sys

MARKER = ".bundle-alive"
_held = None  # the open, locked marker of this process


def claim_and_sweep() -> int:
    """Lock our own folder's marker, then remove dead bundles' folders. Returns how many."""
    global _held
    here = getattr(sys, "_MEIPASS", None)
    if not here or sys.platform == "win32":
        return 0
    import fcntl

    try:
        # Locked before it gets its real name, so a visible marker is never unlocked while
        # its bundle runs.
        tmp = os.path.join(here, MARKER + ".new")
        _held = open(tmp, "a")
        fcntl.flock(_held.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.rename(tmp, os.path.join(here, MARKER))
    except OSError:
        return 0
    parent = os.path.dirname(here)
    removed = 0
    try:
        names = os.listdir(parent)
    except OSError:
        return 0
    for name in names:
        folder = os.path.join(parent, name)
        if not name.startswith("_MEI") or folder == here:
            continue
        marker = os.path.join(folder, MARKER)
        try:
            with open(marker, "r") as f:
                fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                shutil.rmtree(folder, ignore_errors=True)
                removed += 1
        except OSError:  # no marker (not ours) or locked (still running)
            continue
    return removed
