# PyInstaller runtime hook: runs before any of the runtime's modules are imported. From here on,
# Ctrl-C ends a bundle with status 130 at once instead of a KeyboardInterrupt traceback during
# imports (issue 8.6); runtime.process installs the same rule again, and the modes that handle
# Ctrl-C themselves (chat, server) take it over.
import os
import signal


def _pyi_rthook():
    def interrupted(signum, frame):
        try:
            os.write(2, b"\n")
        except OSError:
            pass
        os._exit(130)

    signal.signal(signal.SIGINT, interrupted)


_pyi_rthook()
del _pyi_rthook
