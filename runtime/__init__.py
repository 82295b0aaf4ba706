"""The runtime that ships inside every bundle. Imports nothing from bundler/."""

__version__ = "0.1.0"
