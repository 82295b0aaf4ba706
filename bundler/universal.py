"""`bundle build --target universal`: one file for Windows x86-64, Linux x86-64 and Linux aarch64.

The file is the Windows bundle's PE image with a POSIX shell script in its DOS header (the
layout is in docs/format.md, section 6):

    0x00   "MZbundle='" and a newline, then the DOS header's bytes up to e_lfanew (0x3c), inside
           the quotes: Windows reads only "MZ" and e_lfanew; sh reads an assignment
    0x40   "'", a newline, and the launcher script (LAUNCHER below), which ends in exec/exit
    ...    the PE headers, moved down to make room (SizeOfHeaders and every raw pointer follow)
    ...    the sections and PyInstaller's archive, as in the Windows stub
    ...    the payload: the Windows libraries, each Linux runtime ("linux-x86_64/runtime") with
           its libraries, the model once, the table of contents; then the tail

Windows runs the PE as it runs any bundle. From a Linux shell (`./model.exe`, `sh ./model.exe`),
sh runs the script: it picks the runtime by `uname -m`, unpacks it once into the per-user cache
under its SHA-256 (checked before every exec), and execs it with the arguments unchanged and the
file's own path in BUNDLE_UNIVERSAL_FILE, so the runtime maps the model from this file: no copy.

A direct execve of the file (a file manager, subprocess without a shell, systemd) gets ENOEXEC:
the kernel knows no "MZ" format. APE's "MZqFpD" magic is not used: a loader registered for it
would claim the file.
"""

from __future__ import annotations

import shlex
import struct

from runtime.bundlefile.layout import ENTRY_ALIGN, PYI_COOKIE_MAGIC

from .errors import BundleError

SCRIPT_AT = 0x40  # right after the DOS header
ASSIGNMENT = b"MZbundle='\n"  # sh: a variable whose quoted value holds the DOS header's bytes
FILE_ALIGNMENT_MAX = 0x10000

# The launcher. @...@ are filled in per file (numbers and hashes only; nothing from the model).
# POSIX sh as dash, bash, busybox ash and zsh run it; no `'` may appear before SCRIPT_AT.
LAUNCHER = r"""'
# Windows program and sh script: on Linux, runs this machine's runtime (cached) on this file
die() { printf 'error: %s\n' "$*" >&2; exit 1; }
f=$0
case $f in */*) ;; *) [ -f "$f" ] || f=$(command -v "$f") || f=$0 ;; esac
case $f in /*) ;; *) f=$PWD/${f#./} ;; esac
[ -f "$f" ] && [ -r "$f" ] || die "cannot read this file ($0); run it as: sh path/to/it"
case $(uname -s 2>/dev/null)/$(uname -m 2>/dev/null) in
@CASES@*) die "this file runs on @RUNS_ON@, not on $(uname -s) $(uname -m)" ;;
esac
size_of() { set -- $(ls -Lln -- "$1" 2>/dev/null); printf '%s\n' "${5:-0}"; }
n=$(size_of "$f")
[ "$n" -ge @SIZE@ ] || die "this file is incomplete: $n of @SIZE@ bytes ($f); copy it again"
if command -v sha256sum >/dev/null 2>&1; then digest() { sha256sum; }
elif command -v busybox >/dev/null 2>&1; then digest() { busybox sha256sum; }
else die "no sha256sum to check the runtime with; install coreutils or busybox"; fi
intact() { set -- $(digest <"$1" 2>/dev/null); [ "$1" = "$h" ]; }
uid=$(id -u)
owned() {  # ours, nobody else may write; $2=1: private
  [ -d "$1" ] || return 1
  set -- "$1" "$2" $(ls -ldn -- "$1/." 2>/dev/null)
  [ "$5" = "$uid" ] || return 1
  case $3 in ?????w*|????????w*) return 1 ;; esac
  [ "$2" = 0 ] || case $3 in ????------*) ;; *) return 1 ;; esac
  [ ! -h "$1" ] || { set -- $(ls -ldn -- "$1"); [ "$3" = "$uid" ]; }
}
unpack_in() {  # rt=$1/runtimes/$h
  case $1 in /*) ;; *) return 1 ;; esac
  (umask 077; mkdir -p -- "$1/runtimes") 2>/dev/null || return 1
  owned "$1" "$2" && owned "$1/runtimes" 0 || return 1
  x=$1/runtimes/$h
  if ! { [ -f "$x" ] && intact "$x"; }; then
    y=$1/runtimes/.$h.$$.tmp
    (umask 077; dd if="$f" bs=@ALIGN@ skip=$((o / @ALIGN@)) count=$(((s + @ALIGN@ - 1) / @ALIGN@)) \
      | head -c "$s" >"$y"; printf 'MEI\014\013\012\013\016' | dd of="$y" bs=1 seek="$m" conv=notrunc) 2>/dev/null
    if ! intact "$y"; then
      [ "$(size_of "$y")" = "$s" ] && { rm -f -- "$y"; die "the runtime for $t in $f is damaged; copy the file again"; }
      rm -f -- "$y"; return 1
    fi
    chmod 700 "$y" && mv -f -- "$y" "$x" || { rm -f -- "$y"; return 1; }
  fi
  [ -x "$x" ] || { rm -f -- "$x"; return 1; }
  rt=$x
}
if [ -n "${BUNDLE_CACHE_DIR-}" ]; then
  case $BUNDLE_CACHE_DIR in /*) c=$BUNDLE_CACHE_DIR ;; *) c=$PWD/$BUNDLE_CACHE_DIR ;; esac
  unpack_in "$c" 0 || die "BUNDLE_CACHE_DIR=$c cannot hold the runtime: it must be writable, yours alone, not noexec"
else
  { case ${XDG_CACHE_HOME-} in /*) unpack_in "$XDG_CACHE_HOME/bundle" 0 ;; *) false ;; esac; } ||
  { [ -n "${HOME-}" ] && unpack_in "$HOME/.cache/bundle" 0; } ||
  unpack_in "${TMPDIR:-/tmp}/bundle-cache-$uid" 1 || unpack_in "/var/tmp/bundle-cache-$uid" 1 ||
  { [ -n "${XDG_RUNTIME_DIR-}" ] && unpack_in "$XDG_RUNTIME_DIR/bundle-cache-$uid" 1; } ||
  unpack_in "/dev/shm/bundle-cache-$uid" 1 ||
  die "no folder for the runtime cache is writable and allows programs; set BUNDLE_CACHE_DIR"
fi
BUNDLE_UNIVERSAL_FILE=$f
export BUNDLE_UNIVERSAL_FILE
exec "$rt" "$@"
exit 1
"""

# What `uname -m` says on each machine a stored runtime runs on.
UNAME = {"linux-x86_64": "Linux/x86_64|Linux/amd64", "linux-aarch64": "Linux/aarch64|Linux/arm64"}
SAYS = {"windows-x86_64": "Windows x86-64", "linux-x86_64": "Linux x86-64", "linux-aarch64": "Linux aarch64"}


def machines(targets) -> str:
    """'Windows x86-64, Linux x86-64 and Linux aarch64'."""
    names = [SAYS.get(t, t) for t in targets]
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]


def launcher(runtimes: dict[str, tuple[int, int, str, int]], file_size: int, targets) -> bytes:
    """The script for a file whose stored runtimes are at runtimes[target] = (absolute offset,
    size, SHA-256 once restored, where its cookie's magic goes), file_size bytes long, running
    on targets."""
    cases = "".join(f"{UNAME[t]}) t={shlex.quote(SAYS[t])} o={o} s={s} h={h} m={m} ;;\n"
                    for t, (o, s, h, m) in runtimes.items())
    text = (LAUNCHER.replace("@CASES@", cases).replace("@RUNS_ON@", machines(targets))
            .replace("@SIZE@", str(file_size)).replace("@ALIGN@", str(ENTRY_ALIGN)))
    return text.encode("ascii")


# -- the PE image, with room for the script -------------------------------------------------------


def _u16(b, at):
    return struct.unpack_from("<H", b, at)[0]


def _u32(b, at):
    return struct.unpack_from("<I", b, at)[0]


def make_room(pe: bytes) -> bytes:
    """The Windows stub with its PE headers moved down as far as they go (design: the headers,
    mapped at RVA 0, must end before the first section's RVA), every file offset that points
    past them moved by the same amount. What lies between 0x40 and the new e_lfanew is free
    for the script. Refused (BundleError) for anything but the plain PE32+ PyInstaller makes."""
    def bad(why):
        return BundleError(f"the Windows stub cannot carry the universal launcher ({why}); rebuild it with "
                           "`python build.py --target windows-x86_64`")

    if pe[:2] != b"MZ" or len(pe) < 0x200:
        raise bad("not a PE file")
    lfanew = _u32(pe, 0x3C)
    if pe[lfanew:lfanew + 4] != b"PE\0\0":
        raise bad("no PE signature")
    coff = lfanew + 4
    n_sections, opt_size = _u16(pe, coff + 2), _u16(pe, coff + 16)
    opt = coff + 20
    if _u16(pe, opt) != 0x20B:
        raise bad("not PE32+")
    file_align, headers_size = _u32(pe, opt + 36), _u32(pe, opt + 60)
    n_dirs = _u32(pe, opt + 108)
    table = opt + opt_size
    sections = [struct.unpack_from("<8sIIII", pe, table + 40 * i) for i in range(n_sections)]
    if not 0x200 <= file_align <= FILE_ALIGNMENT_MAX or table + 40 * n_sections > headers_size:
        raise bad("unexpected header sizes")
    if n_dirs > 4 and _u32(pe, opt + 112 + 8 * 4 + 4):
        raise bad("it is signed; sign the universal file after building it instead")
    first_rva = min(va for _, _, va, _, _ in sections)
    shift = (first_rva - headers_size) // file_align * file_align
    if shift < 0x600 or any(ptr and ptr < headers_size for *_, ptr in sections):
        raise bad("no room before its first section")
    # The headers go last in the new room (8-byte aligned), the script gets all before them.
    headers = pe[lfanew:table + 40 * n_sections]
    lfanew2 = (headers_size + shift - len(headers)) // 8 * 8
    out = bytearray(pe[:SCRIPT_AT]) + bytes(lfanew2 - SCRIPT_AT) + headers
    out += bytes(headers_size + shift - len(out)) + pe[headers_size:]
    struct.pack_into("<I", out, 0x3C, lfanew2)
    opt2 = lfanew2 + 24
    struct.pack_into("<I", out, opt2 + 60, headers_size + shift)
    table2 = opt2 + opt_size
    for i, (_, _, _, _, ptr) in enumerate(sections):
        if ptr:
            struct.pack_into("<I", out, table2 + 40 * i + 20, ptr + shift)
    symbols = _u32(pe, coff + 8)
    if symbols:
        struct.pack_into("<I", out, lfanew2 + 12, symbols + shift)
    if n_dirs > 6:  # the debug directory's entries point at their data by file offset
        rva, size = struct.unpack_from("<II", pe, opt + 112 + 8 * 6)
        at = _rva_to_offset(sections, rva)
        for k in range(size // 28 if at is not None else 0):
            entry = at + 28 * k + shift
            ptr = _u32(out, entry + 24)
            if ptr:
                struct.pack_into("<I", out, entry + 24, ptr + shift)
    return bytes(out)


def _rva_to_offset(sections, rva: int) -> int | None:
    for _, vsize, va, raw_size, ptr in sections:
        if va <= rva < va + max(vsize, raw_size):
            return ptr + rva - va
    return None


def script_room(pe: bytes) -> int:
    """Bytes between 0x40 and the PE signature."""
    return _u32(pe, 0x3C) - SCRIPT_AT


def install(pe: bytes, script: bytes) -> bytes:
    """pe (from make_room) with its DOS header turned into the start of the shell script."""
    lfanew = pe[0x3C:0x40]
    if b"'" in lfanew:  # the quote must stay open across it
        raise BundleError("the Windows stub's header offset holds a quote byte; rebuild the stub and report it")
    if len(script) > script_room(pe):
        raise BundleError(f"the universal launcher ({len(script)} bytes) does not fit the room the Windows stub "
                          f"leaves ({script_room(pe)} bytes); report it")
    head = ASSIGNMENT + b"\n" * (0x3C - len(ASSIGNMENT)) + lfanew
    return head + script + bytes(script_room(pe) - len(script)) + pe[SCRIPT_AT + script_room(pe):]


def stored_runtime(exe: bytes) -> tuple[bytes, int]:
    """A Linux runtime as the universal file stores it, and where its PyInstaller cookie's magic
    was: that magic zeroed. Windows' bootloader finds its archive by scanning the file backwards
    for the magic; in a copy cut short (no tail), it would otherwise find this runtime's archive
    first and run it (an aarch64 Python on Windows). The launcher writes the magic back."""
    at = exe.rfind(PYI_COOKIE_MAGIC)
    if at < 0 or exe.find(PYI_COOKIE_MAGIC) != at:
        raise BundleError("a Linux stub does not hold exactly one PyInstaller archive; rebuild it with build.py")
    return exe[:at] + bytes(len(PYI_COOKIE_MAGIC)) + exe[at + len(PYI_COOKIE_MAGIC):], at


def front_with_launcher(pe: bytes, runtimes: dict, file_size: int, targets) -> bytes:
    return install(pe, launcher(runtimes, file_size, targets))
