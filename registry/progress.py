"""The progress callback type every long registry operation accepts.

Hashing and copying report the number of bytes done per chunk, so a caller can drive
any progress bar (the CLI's rich bar, a web view) without the library knowing it.
Defined once here; the store, the fingerprint and the merge engine all take it.
"""

from __future__ import annotations

from collections.abc import Callable

ProgressCallback = Callable[[int], None]
"""Called with the number of bytes (or units) completed since the last call."""
