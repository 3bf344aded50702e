"""Turn a PEFT adapter directory into validated files ready to push.

:func:`prepare_adapter` is the only door into the store for adapter bytes, so it
trusts nothing it reads:

* **Files.** Only ``adapter_config.json``, ``adapter_model.safetensors`` and (if
  present) ``README.md`` are taken, by these fixed names (none has a path
  separator); everything else in the directory is ignored. Each must be a regular
  file; a symlink is followed only if it resolves inside the directory.
* **Config.** A JSON object (4 MB cap, no duplicate keys, no NaN) with
  ``peft_type: "LORA"`` (other PEFT types raise ``UnsupportedAdapterError``) and typed
  fields: ``r`` a positive int, ``lora_alpha`` a finite number, ``target_modules`` a
  string, a list of strings or null, ``rank_pattern``/``alpha_pattern`` objects of
  positive ints / numbers with safe regular-expression keys, booleans for
  ``use_rslora``/``use_dora``/``fan_in_fan_out``/``lora_bias``, ``bias`` one of
  ``none|all|lora_only``, ``lora_dropout`` in [0, 1]
  (:func:`registry.formats.peft_keys.validate_lora_config`).
* **Weights.** The safetensors header is fully validated
  (:mod:`registry.formats.safetensors_header`). LoRA keys are grouped by module
  (:mod:`registry.formats.peft_keys`); for every module A is ``(r_eff, in)`` and B is
  ``(out, r_eff)`` (embedding LoRA: A ``(r_eff, num_embeddings)``, B ``(dim, r_eff)``)
  with ``r_eff`` the config's ``r`` or its ``rank_pattern`` match; LoRA tensors are
  F16/BF16/F32/F64 and 2-D (convolution LoRA raises ``UnsupportedAdapterError``);
  DoRA magnitudes and ``lora_B.bias`` are ``(out,)`` and present only when the
  config says ``use_dora`` / ``lora_bias``.
* **Base.** With ``base_dir``, every module must fit the base model's weight shapes
  (:func:`registry.formats.base_check.check_against_base`; headers only); the first offender
  raises ``BaseMismatchError`` naming the module and both shapes.
* **Pickles.** ``adapter_model.bin`` alone is refused unless ``allow_pickle``; then it
  is loaded with ``torch.load(weights_only=True)`` (torch imported only here) and
  re-saved as safetensors in a fresh temporary ``workdir`` that the caller removes
  (``PreparedAdapter.cleanup()`` or ``with prepare_adapter(...) as prepared:``).
"""

from __future__ import annotations

import shutil
import tempfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from registry.errors import (BadInputError, NotFoundError, UnsupportedAdapterError, environment_error,
                             os_error_in)
from registry.formats.base_check import check_against_base
from registry.formats.dtypes import FLOAT_DTYPES
from registry.formats.peft_keys import (
    LoraKeys,
    rank_for,
    split_keys,
    validate_lora_config,
)
from registry.formats.safetensors_header import SafetensorsHeader, TensorInfo, read_header
from registry.formats.strict_json import load_json_file
from registry.record import TensorSummary

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PICKLE_NAME = "adapter_model.bin"
README_NAME = "README.md"
MAX_CONFIG_BYTES = 4 * 1024 * 1024


@dataclass(frozen=True)
class PreparedAdapter:
    """A validated adapter, ready for ``Store.push(name, prepared.files, record)``.

    Attributes:
        files: Stored name -> path to read (``adapter_config.json``,
            ``adapter_model.safetensors``, optionally ``README.md``).
        peft_config: The parsed ``adapter_config.json``.
        tensors: Counts of the adapter's tensors.
        workdir: Temporary directory holding converted files (pickle conversion
            only), else None. The caller removes it: :meth:`cleanup` or a ``with``
            block.
    """

    files: dict[str, Path]
    peft_config: dict[str, Any]
    tensors: TensorSummary
    workdir: Path | None = None

    def cleanup(self) -> None:
        """Remove :attr:`workdir` (if any); safe to call twice."""
        if self.workdir is not None:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> PreparedAdapter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.cleanup()


def prepare_adapter(
    adapter_dir: str | Path,
    *,
    allow_pickle: bool = False,
    base_dir: str | Path | None = None,
    workdir_parent: str | Path | None = None,
) -> PreparedAdapter:
    """Validate a PEFT LoRA adapter directory (see the module docstring for every check).

    Args:
        adapter_dir: Directory written by ``PeftModel.save_pretrained``.
        allow_pickle: Convert a lone ``adapter_model.bin`` to safetensors with
            ``torch.load(weights_only=True)`` instead of refusing it.
        base_dir: Local base model directory; when given, every LoRA module must fit
            its base weight's shape.
        workdir_parent: Where to create the conversion workdir (default: the system
            temp dir; pass the store's ``tmp/`` to stay on one filesystem).

    Returns:
        The :class:`PreparedAdapter`; remove its ``workdir`` when done.

    Raises:
        NotFoundError: ``adapter_dir`` (or ``base_dir``) does not exist.
        BadInputError: missing or malformed config or weights, a pickle without
            ``allow_pickle``, inconsistent A/B shapes, unsafe symlinks.
        UnsupportedAdapterError: not a LoRA adapter, or convolution LoRA.
        BaseMismatchError: an adapter module does not fit ``base_dir``.
    """
    root = Path(adapter_dir)
    if not root.exists():
        raise NotFoundError(f"adapter directory {root} does not exist", fix="check the path")
    if not root.is_dir():
        raise BadInputError(
            f"{root} is not a directory",
            fix="pass the directory written by PeftModel.save_pretrained",
        )
    config_path = _member(root, CONFIG_NAME)
    if config_path is None:
        raise BadInputError(
            f"{root}: no {CONFIG_NAME}; not a PEFT adapter directory",
            fix="pass the directory written by PeftModel.save_pretrained",
        )
    raw_config = load_json_file(config_path, CONFIG_NAME, max_bytes=MAX_CONFIG_BYTES)
    config = validate_lora_config(raw_config, config_path)
    weights_path = _member(root, WEIGHTS_NAME)
    workdir: Path | None = None
    try:
        if weights_path is None:
            pickle_path = _member(root, PICKLE_NAME)
            if pickle_path is None:
                raise BadInputError(
                    f"{root}: no {WEIGHTS_NAME}",
                    fix="save the adapter with PeftModel.save_pretrained "
                    "(safetensors is the default)",
                )
            if not allow_pickle:
                raise BadInputError(
                    f"{root}: only {PICKLE_NAME} (a pickle, which can run code when "
                    "loaded); refusing it",
                    fix="re-save it as safetensors, or pass --allow-pickle to convert it with "
                    "torch.load(weights_only=True)",
                )
            workdir = Path(tempfile.mkdtemp(prefix="adapterkit-ingest-", dir=workdir_parent))
            weights_path = workdir / WEIGHTS_NAME
            convert_pickle(pickle_path, weights_path)
        header = read_header(weights_path)
        modules, extras = check_adapter_tensors(header, config, weights_path)
        if base_dir is not None:
            check_against_base(modules, extras, header, config, base_dir)
        files = {CONFIG_NAME: config_path, WEIGHTS_NAME: weights_path}
        readme = _member(root, README_NAME)
        if readme is not None:
            files[README_NAME] = readme
        return PreparedAdapter(
            files=files, peft_config=config, tensors=summarize(header), workdir=workdir
        )
    except BaseException:
        if workdir is not None:
            shutil.rmtree(workdir, ignore_errors=True)
        raise


def _member(root: Path, name: str) -> Path | None:
    """The real path of ``root/name`` if it exists, refusing escapes and non-files."""
    path = root / name
    if not path.is_symlink() and not path.exists():
        return None
    try:
        real = path.resolve(strict=True)
    except (OSError, RuntimeError):
        raise BadInputError(
            f"{path}: broken or looping symlink", fix=f"replace {name} by a regular file"
        ) from None
    try:
        real.relative_to(root.resolve())
    except ValueError:
        raise BadInputError(
            f"{path}: symlink points outside the adapter directory ({real})",
            fix=f"copy the file into the directory instead of linking to {real.parent}",
        ) from None
    if not real.is_file():
        raise BadInputError(f"{path}: not a regular file", fix=f"replace {name} by a regular file")
    return real


def _shape(info: TensorInfo) -> str:
    return "(" + ", ".join(str(d) for d in info.shape) + ("," if len(info.shape) == 1 else "") + ")"


def check_adapter_tensors(
    header: SafetensorsHeader, config: dict[str, Any], path: Path
) -> tuple[dict[str, LoraKeys], list[str]]:
    """Check LoRA tensors against each other and the config.

    Args:
        header: Validated header of ``adapter_model.safetensors``.
        config: Validated ``adapter_config.json``.
        path: The weights file, for messages.

    Returns:
        ``(modules, extras)`` as :func:`registry.formats.peft_keys.split_keys`.

    Raises:
        BadInputError: malformed keys, no LoRA tensors, wrong dtypes, inconsistent
            ranks or shapes, DoRA/bias tensors the config does not declare.
        UnsupportedAdapterError: convolution (non 2-D) LoRA.
    """
    try:
        modules, extras = split_keys(header.tensors)
    except BadInputError as exc:
        raise BadInputError(f"{path}: {exc.message}", fix=exc.fix) from None
    if not modules:
        raise BadInputError(
            f"{path}: no LoRA tensors (lora_A/lora_B) found",
            fix="pass a LoRA adapter saved by PeftModel.save_pretrained",
        )
    tensors = header.tensors
    use_dora = config.get("use_dora", False)
    lora_bias = config.get("lora_bias", False)

    def fail(module: str, problem: str) -> BadInputError:
        return BadInputError(
            f"{path}: module {module[:160]!r}: {problem}",
            fix="re-save the adapter with PeftModel.save_pretrained from the trained model",
        )

    for module, keys in modules.items():
        a, b = tensors[keys.a], tensors[keys.b]
        for key in (keys.a, keys.b, keys.magnitude, keys.bias):
            if key is not None and tensors[key].dtype not in FLOAT_DTYPES:
                dtype = tensors[key].dtype
                raise fail(module, f"tensor {key[:160]!r} has dtype {dtype}, not a float")
        if len(a.shape) != 2 or len(b.shape) != 2:
            if len(a.shape) > 2 and not keys.embedding:
                raise UnsupportedAdapterError(
                    f"{path}: module {module[:160]!r}: convolution LoRA "
                    f"(A {_shape(a)}) is not supported",
                    fix="use LoRA on linear or embedding layers",
                )
            raise fail(module, f"A {_shape(a)} and B {_shape(b)} must be 2-D")
        rank = rank_for(module, config["r"], config.get("rank_pattern"))
        if a.shape[0] != b.shape[1]:
            raise fail(module, f"A {_shape(a)} and B {_shape(b)} disagree on the rank")
        if a.shape[0] != rank:
            raise fail(
                module,
                f"A {_shape(a)} and B {_shape(b)} have rank {a.shape[0]} "
                f"but the config gives {rank}",
            )
        out = b.shape[0]
        if keys.magnitude is not None:
            if not use_dora:
                raise fail(module, "has a DoRA magnitude vector but use_dora is not true")
            m = tensors[keys.magnitude]
            if len(m.shape) != 1 or (not keys.embedding and m.shape[0] != out):
                raise fail(module, f"DoRA magnitude {_shape(m)} does not match B {_shape(b)}")
        elif use_dora and not keys.embedding:
            raise fail(module, "use_dora is true but the DoRA magnitude vector is missing")
        if keys.bias is not None:
            if not lora_bias:
                raise fail(module, "has lora_B.bias but lora_bias is not true")
            bias = tensors[keys.bias]
            if bias.shape != (out,):
                raise fail(module, f"lora_B.bias {_shape(bias)} does not match B {_shape(b)}")
    return modules, extras


def summarize(header: SafetensorsHeader) -> TensorSummary:
    """Tensor count, tensors per dtype and total elements of a header."""
    dtypes = Counter(info.dtype for info in header.tensors.values())
    return TensorSummary(
        count=len(header.tensors),
        dtypes=dict(sorted(dtypes.items())),
        parameters=sum(info.numel for info in header.tensors.values()),
    )


def convert_pickle(bin_path: Path, out_path: Path) -> None:
    """Convert a pickled PEFT state dict to safetensors without running pickled code.

    Args:
        bin_path: ``adapter_model.bin``.
        out_path: Where to write the safetensors file.

    Raises:
        BadInputError: the pickle is refused by ``torch.load(weights_only=True)``
            (arbitrary objects, corruption) or is not a dict of tensors.
    """
    import torch  # deferred: the registry never imports torch at module level
    from safetensors.torch import save_file

    fix = "re-save the adapter with PeftModel.save_pretrained (safetensors)"
    try:
        state = torch.load(bin_path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - torch raises many types for bad pickles
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:160]
        raise BadInputError(
            f"{bin_path}: torch.load(weights_only=True) refused it: {first}", fix=fix
        ) from None
    if not isinstance(state, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()
    ):
        raise BadInputError(f"{bin_path}: not a state dict of named tensors", fix=fix)
    tensors = {}
    for key, value in state.items():
        if value.layout != torch.strided or value.is_quantized:
            raise BadInputError(f"{bin_path}: tensor {key[:120]!r} is not a dense tensor", fix=fix)
        tensors[key] = value.detach().to("cpu").contiguous().clone()
    try:
        save_file(tensors, str(out_path), metadata={"format": "pt"})
    except Exception as exc:  # noqa: BLE001 - safetensors raises its own error types
        written = os_error_in(exc)  # a full disk or a file size limit: not the input's fault
        if written is not None:
            raise environment_error(written, path=out_path,
                                    action="converting the adapter to safetensors") from None
        problem = str(exc)[:160]
        raise BadInputError(
            f"{bin_path}: cannot convert to safetensors: {problem}", fix=fix
        ) from None
