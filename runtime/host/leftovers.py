"""Removes PyInstaller temp folders (_MEI*) left behind by bundles that died.

PyInstaller's one-file bootloader unpacks its archive into a fresh _MEIxxxxxx folder at every
launch and deletes it on a normal exit, but a killed or crashed launch leaves it: the "temp
folder filling the disk" complaint against one-file tools. Two kinds are left:

- Claimed folders: each running bundle holds a lock on a marker file in its own folder; a
  folder whose marker is not locked belongs to a bundle that is gone.
- Unclaimed folders (issue 8.5): a launch killed in its first ~0.2 s, or one whose unpacking
  hit a full TMPDIR, never got to write its marker. Such a folder is removed when it is older
  than UNCLAIMED_AGE (a live launch claims its folder within a second) and everything in it is
  a file of our own folder, of no larger size: a partial unpacking of a bundle's runtime. A
  folder holding anything else belongs to another PyInstaller program and is never touched.

Only folders owned by this user, and never symbolic links, are looked at.
"""

from __future__ import annotations

import os
import shutil
import stat
import sys
import time

MARKER = ".bundle-alive"
UNCLAIMED_AGE = 120.0  # seconds
_held = None  # the open, locked marker of this process


def _own_files(root: str) -> dict[str, int]:
    out = {}
    for folder, dirs, files in os.walk(root):
        for name in files + dirs:
            path = os.path.join(folder, name)
            try:
                st = os.lstat(path)
            except OSError:
                continue
            out[os.path.relpath(path, root)] = st.st_size if stat.S_ISREG(st.st_mode) else -1
    return out


def _is_partial_copy(folder: str, ours: dict[str, int]) -> bool:
    """Everything in folder is in ours: same relative name, same kind, no larger."""
    for sub, dirs, files in os.walk(folder):
        for name in files + dirs:
            path = os.path.join(sub, name)
            rel = os.path.relpath(path, folder)
            if rel in (MARKER, MARKER + ".new"):
                continue
            if rel not in ours:
                return False
            try:
                st = os.lstat(path)
            except OSError:
                return False
            if stat.S_ISREG(st.st_mode):
                if ours[rel] < 0 or st.st_size > ours[rel]:
                    return False
            elif stat.S_ISDIR(st.st_mode):
                if ours[rel] != -1:
                    return False
            else:
                return False
    return True


def _try_lock(f) -> bool:
    """An exclusive lock on the open file f, without waiting; released when its process ends."""
    if sys.platform == "win32":
        import msvcrt

        try:
            f.seek(0)
            msvcrt.locking(f.fileno(), msvcrt.LK_NBLCK, 1)
            return True
        except OSError:
            return False
    import fcntl

    try:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except OSError:
        return False


def _claim(here: str) -> bool:
    global _held
    try:
        if sys.platform == "win32":
            # Windows cannot rename a file that is open; the marker is made under its own name,
            # and a sweeper leaves folders younger than UNCLAIMED_AGE alone (the moment between
            # creating and locking it is covered by that).
            _held = open(os.path.join(here, MARKER), "a")
            return _try_lock(_held)
        # Locked before it gets its real name, so a visible marker is never unlocked while
        # its bundle runs.
        tmp = os.path.join(here, MARKER + ".new")
        _held = open(tmp, "a")
        if not _try_lock(_held):
            return False
        os.rename(tmp, os.path.join(here, MARKER))
        return True
    except OSError:
        return False


def claim_and_sweep(now: float | None = None) -> int:
    """Lock our own folder's marker, then remove dead bundles' folders. Returns how many."""
    here = getattr(sys, "_MEIPASS", None)
    if not here or not _claim(here):
        return 0
    windows = sys.platform == "win32"
    parent = os.path.dirname(here)
    now = time.time() if now is None else now
    uid = os.getuid() if hasattr(os, "getuid") else None  # Windows: the temp folder is the user's own
    ours = None
    removed = 0
    try:
        names = os.listdir(parent)
    except OSError:
        return 0
    for name in names:
        folder = os.path.join(parent, name)
        if not name.startswith("_MEI") or folder == here:
            continue
        try:
            st = os.lstat(folder)
        except OSError:
            continue
        if not stat.S_ISDIR(st.st_mode) or (uid is not None and st.st_uid != uid):
            continue
        young = now - st.st_mtime < UNCLAIMED_AGE
        marker = os.path.join(folder, MARKER)
        try:
            with open(marker, "r") as f:
                dead = _try_lock(f) and not (windows and young)
            if dead:
                shutil.rmtree(folder, ignore_errors=True)
                removed += 1
            continue
        except FileNotFoundError:
            pass  # unclaimed: see below
        except OSError:
            continue
        if young:
            continue
        if ours is None:
            ours = _own_files(here)
        if _is_partial_copy(folder, ours):
            shutil.rmtree(folder, ignore_errors=True)
            removed += 1
    return removed
