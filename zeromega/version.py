"""The package version, kept import-free so setup.cfg can read it."""

__version__ = "0.1.0"
