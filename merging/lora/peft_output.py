"""The merged adapter as a PEFT adapter: its config and its directory.

:func:`output_config` derives ``adapter_config.json`` from the inputs: the first
input's config with ``r`` = the most common output rank, ``lora_alpha = r`` and
``use_rslora = false`` so the scale is 1 (every input's scale and weight is already
folded into the factors), per-module ``rank_pattern``/``alpha_pattern`` (keys are
full module paths, alpha = rank) where a module's rank differs, ``target_modules`` =
the union of the inputs' lists (or, when an input uses a regex or layer restrictions,
a regex matching exactly the merged modules), ``modules_to_save`` = the union, and
``ensure_weight_tying`` true only where the tied embedding pair was merged as one LoRA
(:mod:`merging.tied`).

:func:`write_peft_dir` writes ``adapter_config.json`` + ``adapter_model.safetensors``
into a temporary directory beside the target and renames it into place, so the target
is absent/empty or complete; files are 0644 and directories 0755 whatever the umask.
"""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from registry.errors import environment_error, os_error_in

from registry.fsutil import check_out_dir, remove_stale_dirs, temp_dir_beside
from registry.ingest import CONFIG_NAME, WEIGHTS_NAME
from registry.formats.peft_keys import strip_prefix

if TYPE_CHECKING:
    from merging.adapter import LoraAdapter
    from merging.lora.results import MergeResult

_RESTRICTIONS = ("layers_to_transform", "layers_pattern", "exclude_modules")


def _target_modules(adapters: Sequence[LoraAdapter], names: Sequence[str]) -> dict[str, Any]:
    cfgs = [a.config for a in adapters]
    targets = [c.get("target_modules") for c in cfgs]
    restrictions = [tuple(json.dumps(c.get(k), sort_keys=True) for k in _RESTRICTIONS) for c in cfgs]
    lists = [t for t in targets if isinstance(t, list)]
    if len(lists) == len(targets) and len(set(restrictions)) == 1:
        union = sorted(set[str]().union(*lists))
        paths = [strip_prefix(n) for n in names]
        if all(any(p == t or p.endswith("." + t) for t in union) for p in paths):
            return {"target_modules": union, **{k: cfgs[0].get(k) for k in _RESTRICTIONS}}
    regex = "^(?:" + "|".join(re.escape(strip_prefix(n)) for n in names) + ")$"
    return {"target_modules": regex, **{k: None for k in _RESTRICTIONS}}


def output_config(adapters: Sequence[LoraAdapter], ranks: dict[str, int],
                  ties: bool | None = None) -> dict[str, Any]:
    """The merged adapter's ``adapter_config.json`` (see the module docstring).

    Args:
        adapters: The merge inputs, in order (the first one's config is the template).
        ranks: Output rank of every merged module (full module path -> rank).
        ties: ``ensure_weight_tying`` of the output (:func:`merging.tied.output_ties`);
            None leaves the template's.

    Raises:
        Nothing of its own; the inputs' configs were validated when they were loaded.
    """
    config = copy.deepcopy(adapters[0].config)
    counts = Counter(ranks.values())
    default = max(counts, key=lambda r: (counts[r], r))
    pattern = {strip_prefix(n): r for n, r in sorted(ranks.items()) if r != default}
    saved = sorted(set().union(*(a.config.get("modules_to_save") or [] for a in adapters)))
    config.update(
        r=default, lora_alpha=default, rank_pattern=pattern, alpha_pattern=dict(pattern),
        use_rslora=False, use_dora=False, lora_bias=False, inference_mode=True,
        modules_to_save=saved or None, **_target_modules(adapters, sorted(ranks)),
    )
    if ties is not None:
        config["ensure_weight_tying"] = ties
    for key in _RESTRICTIONS:
        if config.get(key) is None:
            config.pop(key, None)
    return config


def write_peft_dir(result: MergeResult, out_dir: str | Path) -> Path:
    """Write ``adapter_config.json`` + ``adapter_model.safetensors`` atomically.

    Files go to a temporary directory beside ``out_dir`` (:func:`stage_peft_dir`) that is
    renamed into place (:func:`publish_staged`), so ``out_dir`` is either absent/empty or
    complete. Files are 0644 and created directories 0755 whatever the umask
    (safetensors and ``open`` follow it).

    Raises:
        ConflictError: ``out_dir`` exists and is not an empty directory.
        OSError: The parent directory cannot be written.
    """
    staged = stage_peft_dir(result, out_dir)
    try:
        return publish_staged(staged, out_dir)
    except BaseException:
        shutil.rmtree(staged, ignore_errors=True)
        raise


def stage_peft_dir(result: MergeResult, out_dir: str | Path) -> Path:
    """The PEFT directory written complete into a hidden temp directory beside ``out_dir``
    (``.OUT.XXXXXXXX.tmp``; one a killed run left is removed once idle an hour).

    Raises:
        ConflictError: ``out_dir`` exists and is not an empty directory.
        EnvironmentFailure: The parent directory cannot be made or written.
    """
    from safetensors.torch import save_file

    out = check_out_dir(out_dir)
    # what a killed run into the same OUT left (mkdtemp's 8 random characters), once idle
    remove_stale_dirs(out.parent, re.compile(re.escape(f".{out.name}.") + r"[a-z0-9_]{8}\.tmp\Z"))
    tmp = temp_dir_beside(out, prefix=f".{out.name}.", suffix=".tmp")
    try:
        os.chmod(tmp, 0o755)
        try:
            save_file(result.tensors, str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
        except Exception as exc:  # safetensors names a full disk only in its message
            written = os_error_in(exc)
            if written is None:
                raise
            raise environment_error(written, path=out, action="writing the merged adapter") from None
        (tmp / CONFIG_NAME).write_text(json.dumps(result.config, indent=2, sort_keys=True) + "\n",
                                       encoding="utf-8")
        for name in (WEIGHTS_NAME, CONFIG_NAME):
            os.chmod(tmp / name, 0o644)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return tmp


def publish_staged(staged: Path, out_dir: str | Path) -> Path:
    """Rename a :func:`stage_peft_dir` directory onto ``out_dir`` (an empty one is replaced).

    Raises:
        ConflictError: ``out_dir`` was filled meanwhile.
    """
    out = check_out_dir(out_dir)
    if out.exists():
        out.rmdir()
    os.rename(staged, out)
    return out
