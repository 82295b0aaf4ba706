/*
 * Compiled into the stub's PyInstaller bootloader (buildsys/bootloader.py patches three calls in).
 *
 * 1. A damaged archive locator is "damaged", never a loop. PyInstaller's bootloader trusts the
 *    88-byte cookie at the end of the file: one flipped byte of pkg_length, or the cookie
 *    appended twice, makes it read its table of contents from the wrong place, and an entry
 *    whose length reads as 0 makes it walk that table forever at 100% CPU. Before the table is
 *    used, bundle_locator_sane() checks that the archive and its table lie inside the file, and
 *    bundle_toc_sane() that the entries chain exactly to the table's end, each with a name that
 *    ends inside it and data that lies before the table.
 * 2. Its early failures say one line in the project's words: the first error message is turned
 *    into "error: ..." (no space left, a file that cannot be read, a damaged file), and every
 *    later one is dropped (a failed extraction otherwise prints three or four "[PYI-...]" lines).
 *    BUNDLE_DEBUG=1 shows PyInstaller's own messages as they are.
 *    A failure of the bootloader's own exits with status 1, as every error of the project does
 *    (PyInstaller's is 255).
 * 3. SIGXFSZ (a file-size limit, `ulimit -f`) is ignored, so a write past the limit fails with
 *    EFBIG and is reported, instead of killing the process and leaving the unpacked folder.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <signal.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <arpa/inet.h>

#include "pyi_archive.h"

static int bundle_damaged = 0;   /* set when the locator or the table was found damaged */
static int bundle_reported = 0;  /* one error line per process */

__attribute__((constructor)) static void bundle_guard_init(void)
{
    signal(SIGXFSZ, SIG_IGN);
}

int bundle_locator_sane(FILE *fp, uint64_t cookie_pos, uint32_t pkg_length, uint32_t toc_offset,
                        uint32_t toc_length, uint32_t python_version, const char *python_libname)
{
    uint64_t end = cookie_pos + sizeof(struct ARCHIVE_COOKIE);
    int64_t size;
    char version[32];

    /* The Python version and the library's name must agree (311 and "libpython3.11.so.1.0"): a
     * flipped version makes the bootloader set Python up for another version, which fails with
     * a traceback instead of a word about the file. */
    snprintf(version, sizeof(version), "%u.%u", python_version / 100, python_version % 100);
    if (python_version < 300 || python_version >= 400 || memchr(python_libname, 0, 64) == NULL
        || strstr(python_libname, version) == NULL) {
        bundle_damaged = 1;
        return 0;
    }

    if (fseeko(fp, 0, SEEK_END) != 0 || (size = (int64_t)ftello(fp)) < 0) {
        bundle_damaged = 1;
        return 0;
    }
    if (end > (uint64_t)size || (uint64_t)pkg_length > end || pkg_length < sizeof(struct ARCHIVE_COOKIE)
        || toc_length == 0 || toc_offset > pkg_length - sizeof(struct ARCHIVE_COOKIE)
        || toc_length > pkg_length - sizeof(struct ARCHIVE_COOKIE) - toc_offset) {
        bundle_damaged = 1;
        return 0;
    }
    return 1;
}

/* The table as read from the file (big-endian fields), before the bootloader walks it. */
int bundle_toc_sane(const struct TOC_ENTRY *toc, uint32_t toc_length, uint32_t toc_offset)
{
    const char *p = (const char *)toc;
    const char *end = p + toc_length;
    const size_t head = offsetof(struct TOC_ENTRY, name);

    while (p < end) {
        const struct TOC_ENTRY *e = (const struct TOC_ENTRY *)p;
        uint32_t len, offset, length;
        if ((size_t)(end - p) < head + 1) {
            break;
        }
        len = ntohl(e->entry_length);
        offset = ntohl(e->offset);
        length = ntohl(e->length);
        if (len < head + 1 || len > (size_t)(end - p) || memchr(e->name, 0, len - head) == NULL
            || offset > toc_offset || length > toc_offset - offset) {
            break;
        }
        p += len;
    }
    if (p != end) {
        bundle_damaged = 1;
        return 0;
    }
    return 1;
}

static const char *bundle_self(void)
{
    static char path[4096];
    ssize_t n = readlink("/proc/self/exe", path, sizeof(path) - 1);
    if (n <= 0) {
        return "this file";
    }
    path[n] = '\0';
    return path;
}

static void bundle_temp_dir(char *out, size_t size)
{
    const char *names[] = {"TMPDIR", "TEMP", "TMP"};
    size_t i;
    for (i = 0; i < sizeof(names) / sizeof(names[0]); i++) {
        const char *v = getenv(names[i]);
        if (v && v[0]) {
            snprintf(out, size, "%s", v);
            return;
        }
    }
    snprintf(out, size, "/tmp");
}

/* Called before PyInstaller prints an ERROR message: error_code is the errno of a failed call,
 * or 0. Returns 1 when the message was handled here (said in our words, or dropped as a second
 * one), 0 to let PyInstaller print it (BUNDLE_DEBUG). */
int bundle_bootloader_errorv(int error_code, const char *fmt, va_list args)
{
    const char *debug = getenv("BUNDLE_DEBUG");
    char message[1024];
    char where[4096];
    char text[1024];
    size_t n;

    if (debug && (strcmp(debug, "1") == 0 || strcmp(debug, "true") == 0 || strcmp(debug, "yes") == 0)) {
        return 0;
    }
    if (bundle_reported) {
        return 1;
    }
    bundle_reported = 1;
    vsnprintf(message, sizeof(message), fmt, args);
    if (error_code == 0 && (strstr(message, "temporary directory") != NULL
                            || (strstr(message, "Failed to extract") != NULL
                                && (errno == ENOSPC || errno == EDQUOT || errno == EFBIG)))) {
        error_code = errno;  /* a failed mkdtemp, or a write inside zlib's inflate: told without errno */
    }
    if (error_code == EFBIG) {
        bundle_temp_dir(where, sizeof(where));
        fprintf(stderr, "error: cannot unpack the runtime into %s: a file-size limit (ulimit -f) is lower than its "
                "files; raise the limit and run again\n", where);
        return 1;
    }
    if (error_code == ENOSPC || error_code == EDQUOT) {
        bundle_temp_dir(where, sizeof(where));
        fprintf(stderr, "error: cannot unpack the runtime into %s (%s); free some disk space there, or set TMPDIR "
                "to a folder on another disk\n", where, strerror(error_code));
        return 1;
    }
    if (strstr(message, "Failed to read cookie") != NULL) {  /* the file ends inside its locator */
        fprintf(stderr, "error: %s ends inside its archive locator: this file is incomplete; copy it again\n",
                bundle_self());
        return 1;
    }
    if (strstr(message, "PKG archive") != NULL) {
        const char *self = bundle_self();
        if (access(self, R_OK) != 0) {
            fprintf(stderr, "error: cannot read %s (%s): a bundle must be readable to run; run chmod a+r on it\n",
                    self, strerror(errno));
        } else {
            fprintf(stderr, "error: %s is damaged (%s); copy the file again\n", self,
                    bundle_damaged ? "its archive locator does not fit the file"
                                   : "its runtime archive cannot be found: damaged or incomplete");
        }
        return 1;
    }
    /* Anything else: PyInstaller's words, on one line, without its prefix. */
    snprintf(text, sizeof(text), "%s", message);
    for (n = 0; text[n]; n++) {  /* one line of plain text, whatever bytes a damaged file put in it */
        unsigned char c = (unsigned char)text[n];
        if (c < 0x20 || c > 0x7e) {
            text[n] = (c == '\n' || c == '\r' || c == '\t') ? ' ' : '?';
        }
    }
    while (n > 0 && (text[n - 1] == ' ' || text[n - 1] == '!' || text[n - 1] == '.')) {
        text[--n] = '\0';
    }
    if (error_code) {
        fprintf(stderr, "error: the runtime could not start: %s (%s); run it again, or copy the file again if it "
                "persists\n", text, strerror(error_code));
    } else {
        fprintf(stderr, "error: the runtime could not start: %s; run it again, or copy the file again if it "
                "persists\n", text);
    }
    return 1;
}

/* main()'s return value: the program's exit status, or PyInstaller's -1 (shown as 255) for a
 * failure of the bootloader itself, made 1. */
int bundle_exit_status(int status)
{
    return status == -1 ? 1 : status;
}
