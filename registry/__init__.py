"""Content-addressed adapter registry (no torch at import time)."""

__version__ = "0.1.0"
