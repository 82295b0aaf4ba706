/*
 * Compiled into the stub's PyInstaller bootloader (buildsys/bootloader.py), run before its main().
 *
 * PyInstaller's one-file bootloader unpacks the Python runtime into $TMPDIR (or $TEMP, $TMP,
 * /tmp, /var/tmp) and then loads libpython from there. Where that folder is on a filesystem
 * mounted noexec (hardened servers do that to /tmp), the load fails ("failed to map segment
 * from shared object") and the program cannot even say why. This constructor looks first: when
 * the folder the bootloader would use is not usable for code, it points TMPDIR at the first
 * folder that is (writable, on a filesystem that allows exec), in this order:
 *   /tmp, /var/tmp, $XDG_RUNTIME_DIR, $XDG_CACHE_HOME/bundle/tmp, $HOME/.cache/bundle/tmp
 *   (HOME from the environment, else the passwd entry), /dev/shm.
 * Nothing is ever written into the working directory. The user's own TMPDIR is kept in
 * BUNDLE_TMPDIR_WAS ("unset" or "set:<value>") and restored by the runtime's first Python code
 * (build_hooks/rth_bundle_signals.py), so programs the bundle starts see the user's TMPDIR; the
 * reason is kept in BUNDLE_UNPACK_REASON for --info.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <pwd.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/statvfs.h>
#include <unistd.h>

#define BUNDLE_PATH_MAX 4096

static int bundle_usable_for_code(const char *dir)
{
    struct statvfs st;
    struct stat sb;
    if (dir == NULL || dir[0] != '/' || strlen(dir) >= BUNDLE_PATH_MAX - 64) {
        return 0;
    }
    if (stat(dir, &sb) != 0 || !S_ISDIR(sb.st_mode)) {
        return 0;
    }
    if (statvfs(dir, &st) != 0 || (st.f_flag & (ST_NOEXEC | ST_RDONLY))) {
        return 0;
    }
    return access(dir, W_OK | X_OK) == 0;
}

/* mkdir -p with mode 0700 for the parts it creates; 0 when dir exists afterwards. */
static int bundle_make_dirs(const char *dir)
{
    char path[BUNDLE_PATH_MAX];
    char *p;
    if (snprintf(path, sizeof(path), "%s", dir) >= (int)sizeof(path)) {
        return -1;
    }
    for (p = path + 1; *p; p++) {
        if (*p == '/') {
            *p = '\0';
            if (mkdir(path, 0700) != 0 && errno != EEXIST) {
                return -1;
            }
            *p = '/';
        }
    }
    if (mkdir(path, 0700) != 0 && errno != EEXIST) {
        return -1;
    }
    return 0;
}

static const char *bundle_home(void)
{
    const char *home = getenv("HOME");
    struct passwd *pw;
    if (home != NULL && home[0] == '/') {
        return home;
    }
    pw = getpwuid(getuid());
    if (pw != NULL && pw->pw_dir != NULL && pw->pw_dir[0] == '/') {
        return pw->pw_dir;
    }
    return NULL;
}

/* Try one candidate; on success point TMPDIR at it and return 1. */
static int bundle_try(const char *dir, int create, const char *was_name, const char *was_value)
{
    char reason[BUNDLE_PATH_MAX + 128];
    if (dir == NULL || dir[0] != '/') {
        return 0;
    }
    if (create && bundle_make_dirs(dir) != 0) {
        return 0;
    }
    if (!bundle_usable_for_code(dir)) {
        return 0;
    }
    if (getenv("TMPDIR") != NULL) {
        snprintf(reason, sizeof(reason), "set:%s", getenv("TMPDIR"));
        setenv("BUNDLE_TMPDIR_WAS", reason, 1);
    } else {
        setenv("BUNDLE_TMPDIR_WAS", "unset", 1);
    }
    snprintf(reason, sizeof(reason), "%s (%s) cannot hold code (noexec, read-only or not writable)",
             was_name, was_value ? was_value : "unset");
    setenv("BUNDLE_UNPACK_REASON", reason, 1);
    setenv("TMPDIR", dir, 1);
    return 1;
}

__attribute__((constructor)) static void bundle_choose_unpack_dir(void)
{
    static const char *vars[] = {"TMPDIR", "TEMP", "TMP"};
    const char *current = NULL, *current_name = "/tmp";
    const char *home, *xdg;
    char path[BUNDLE_PATH_MAX];
    size_t i;

    if (getenv("BUNDLE_TMPDIR_WAS") != NULL || getenv("_PYI_APPLICATION_HOME_DIR") != NULL) {
        return; /* the bootloader's own child process: the parent already chose */
    }
    for (i = 0; i < sizeof(vars) / sizeof(vars[0]); i++) {
        const char *v = getenv(vars[i]);
        if (v != NULL && v[0] != '\0') {
            current = v;
            current_name = vars[i];
            break;
        }
    }
    if (bundle_usable_for_code(current ? current : "/tmp")) {
        return;
    }
    if (current == NULL) {
        current = "/tmp";
    }
    if (bundle_try("/tmp", 0, current_name, current) || bundle_try("/var/tmp", 0, current_name, current)) {
        return;
    }
    if (bundle_try(getenv("XDG_RUNTIME_DIR"), 0, current_name, current)) {
        return;
    }
    xdg = getenv("XDG_CACHE_HOME");
    if (xdg != NULL && xdg[0] == '/' && snprintf(path, sizeof(path), "%s/bundle/tmp", xdg) < (int)sizeof(path)
        && bundle_try(path, 1, current_name, current)) {
        return;
    }
    home = bundle_home();
    if (home != NULL && snprintf(path, sizeof(path), "%s/.cache/bundle/tmp", home) < (int)sizeof(path)
        && bundle_try(path, 1, current_name, current)) {
        return;
    }
    if (bundle_try("/dev/shm", 0, current_name, current)) {
        return;
    }
    fprintf(stderr, "error: no folder can hold this program's runtime: %s (%s) and /tmp, /var/tmp, "
            "$XDG_RUNTIME_DIR, ~/.cache, /dev/shm are all noexec, read-only or not writable; "
            "set TMPDIR to a writable folder on a filesystem that allows running programs\n",
            current_name, current);
    exit(1);
}
