"""bundle: turn a GGUF model into one executable file (build-time side)."""

__version__ = "0.1.0"
