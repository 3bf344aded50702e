"""The output directory of a streamed model rewrite (merge-and-unload, requantization).

* :func:`staged_output` gives a temp directory next to ``OUT_DIR`` that is renamed
  into place only on success and removed on any error, so an interrupted run
  leaves nothing at ``OUT_DIR`` and no temp directory; :func:`check_out_dir`
  refuses an ``OUT_DIR`` that is not absent or empty (before and again at the rename).
* :func:`copy_non_weight_files` carries everything but the weights over from the
  base (config, tokenizer, chat template, generation config...).
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path

from merging.model.layout import INDEX_NAME, WEIGHT_EXTENSIONS
from registry.fsutil import check_out_dir, remove_stale_dirs, temp_dir_beside


def copy_non_weight_files(src_dir: Path, dst_dir: Path, skip: set[str]) -> list[str]:
    """Copy every file and folder of ``src_dir`` except ``skip`` (config, tokenizer, chat
    template, generation config...) unchanged; returns the copied top-level names.

    Weight files (``*.safetensors``, pickles, GGUF; also inside folders such as
    Llama's ``original/``), their indexes and hidden entries (``.cache``) are not
    copied: the output's weights are the ones just written.
    """
    copied = []
    ignore = shutil.ignore_patterns(*(f"*{ext}" for ext in WEIGHT_EXTENSIONS), ".*")
    for entry in sorted(src_dir.iterdir()):
        name = entry.name
        if name in skip or name.startswith(".") or name.endswith(WEIGHT_EXTENSIONS) or \
                name in ("pytorch_model.bin.index.json", INDEX_NAME):
            continue
        if entry.is_dir():
            shutil.copytree(entry, dst_dir / name, symlinks=False, ignore=ignore)
        elif entry.is_file():
            shutil.copy2(entry, dst_dir / name)
        else:
            continue
        copied.append(name)
    return copied


@contextlib.contextmanager
def staged_output(out_dir: str | Path, *, sync: bool = True) -> Iterator[Path]:
    """A temp directory next to ``out_dir``, renamed onto it when the block succeeds
    (and the rename fsynced with ``sync``; the files are the caller's to fsync).

    On any exception (including KeyboardInterrupt) the temp directory is removed and
    nothing appears at ``out_dir``. An existing empty ``out_dir`` is replaced.

    Raises:
        ConflictError: ``out_dir`` exists and is not empty (checked before and again
            just before the rename).
    """
    out_dir = Path(out_dir).absolute()
    check_out_dir(out_dir)
    # what a killed run into the same OUT left (mkdtemp's 8 random characters), once idle
    remove_stale_dirs(out_dir.parent, re.compile(re.escape(f".{out_dir.name}.tmp-") + r"[a-z0-9_]{8}\Z"))
    tmp = temp_dir_beside(out_dir, prefix=f".{out_dir.name}.tmp-")
    try:
        yield tmp
        check_out_dir(out_dir)
        if out_dir.is_dir():
            out_dir.rmdir()
        os.chmod(tmp, 0o755)
        os.replace(tmp, out_dir)
        if sync:
            with contextlib.suppress(OSError):
                fd = os.open(out_dir.parent, os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
