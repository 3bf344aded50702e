"""Real failing file systems for the environment-error tests: small and read-only tmpfs.

``chmod -R a-w`` does not stop root, and a "disk full" is only honest on a file
system that is really full, so these tests mount a tmpfs of a few megabytes under
``tmp_path`` (``mount -t tmpfs -o size=5m``) and remount it read-only when they need
EROFS. Mounting needs root (or CAP_SYS_ADMIN): without it, or when ``mount`` fails
(a container without the capability), the test is skipped, not failed. Every mount
is unmounted by the fixture's finalizer, lazily (``umount -l``) if it is still busy,
so a failing test never leaves a mount behind; each test mounts under its own
``tmp_path``, so the tests run in parallel and in any order.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest


def _mount_tool() -> str:
    tool = shutil.which("mount")
    if os.geteuid() != 0 or tool is None or shutil.which("umount") is None:
        pytest.skip("mounting a tmpfs needs root and mount/umount")
    return tool


@pytest.fixture()
def tmpfs(tmp_path: Path) -> Iterator[Callable[..., Path]]:
    """A factory ``tmpfs(name="mnt", size="5m") -> Path`` mounting a fresh tmpfs."""
    mounted: list[Path] = []

    def mount(name: str = "mnt", size: str = "5m") -> Path:
        tool = _mount_tool()
        target = tmp_path / name
        target.mkdir()
        proc = subprocess.run([tool, "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs",
                               str(target)], capture_output=True, text=True, timeout=30)
        if proc.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.strip()}")
        mounted.append(target)
        return target

    yield mount
    for target in reversed(mounted):
        proc = subprocess.run(["umount", str(target)], capture_output=True, timeout=30)
        if proc.returncode != 0:
            subprocess.run(["umount", "-l", str(target)], capture_output=True, timeout=30)


def remount_read_only(target: Path) -> None:
    """Remount a tmpfs from :func:`tmpfs` read-only (skip the test if that fails)."""
    proc = subprocess.run(["mount", "-o", "remount,ro", str(target)], capture_output=True,
                          text=True, timeout=30)
    if proc.returncode != 0:
        pytest.skip(f"cannot remount read-only: {proc.stderr.strip()}")
