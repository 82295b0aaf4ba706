# PyInstaller runtime hook: give the user's TMPDIR back. When the folder the bootloader would have
# unpacked into could not hold code (a noexec /tmp), buildsys/bundle_unpack_dir.c pointed TMPDIR
# at one that can, and kept the user's value; programs the bundle starts, and its own temporary
# files, use the user's. Where the runtime was unpacked, and why there, stay for --info.
import os
import sys

_was = os.environ.pop("BUNDLE_TMPDIR_WAS", None)
if _was is not None:
    sys._bundle_unpack_reason = os.environ.pop("BUNDLE_UNPACK_REASON", "")
    if _was.startswith("set:"):
        os.environ["TMPDIR"] = _was[4:]
    else:
        os.environ.pop("TMPDIR", None)
