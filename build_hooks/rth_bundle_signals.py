# PyInstaller runtime hook: the first code of ours that runs, before any of the runtime's
# modules are imported. From here on, Ctrl-C ends a bundle with status 130 at once instead of a
# KeyboardInterrupt traceback (issue 8.6); runtime.host.process installs the same rule again, and the
# modes that handle Ctrl-C themselves (chat, server) take it over. A Ctrl-C that lands while
# Python itself starts, before this line (a few tens of milliseconds), still ends in PyInstaller's
# own "[PYI-…] Failed to execute script" message: only a bootloader of our own could close that.
try:
    import os
    import signal

    def _bundle_interrupted(signum, frame):
        try:
            os.write(2, b"\n")
        except OSError:
            pass
        os._exit(130)

    signal.signal(signal.SIGINT, _bundle_interrupted)
except KeyboardInterrupt:
    import os

    os._exit(130)
