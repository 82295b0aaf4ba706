"""Build machinery for the portable stub (used by build.py only; never shipped in a bundle)."""
