"""Read a PEFT LoRA adapter directory as per-module factors, lazily.

A LoRA module ``M`` contributes the true delta ``ΔW = s · B · A`` to its base
weight, with ``A`` of shape ``(r, in)``, ``B`` of shape ``(out, r)`` and the scale
``s = lora_alpha / r`` (``lora_alpha / sqrt(r)`` with ``use_rslora``). ``r`` and
``lora_alpha`` are the module's own: the first ``rank_pattern`` / ``alpha_pattern``
key matching it the way ``peft.utils.other.get_pattern_key`` matches
(``re.match(rf"(.*\\.)?({key})$", name)`` on the name without
``base_model.model.``), else the config's ``r`` / ``lora_alpha``
(:func:`registry.formats.peft_keys.rank_for` / :func:`~registry.formats.peft_keys.alpha_for`).
Embedding LoRA (``lora_embedding_A``/``_B``) is read the same way: its delta is
``(B @ A).T`` in weight space, and every merge method here is transpose-equivariant,
so the engine works in factor space for both kinds.

Validation reuses the registry's ingest checks (config field types, safetensors
header, A/B shapes against the config's ranks). On top of that, merging refuses
what it cannot merge correctly (``UnsupportedAdapterError``): DoRA (``use_dora``:
the magnitude vector makes the delta depend on the base weight), ``lora_bias``,
adapters whose initialisation rewrote the base weights (PiSSA, OLoRA, CorDA,
LoftQ: their delta is not ``s·B·A`` relative to the original base),
``trainable_token_indices``, ``target_parameters``, ``layer_replication``,
aLoRA invocation tokens. (An ``ensure_weight_tying`` pair whose sides differ is
refused where the base is known to tie them: :mod:`merging.tied`.)

Only headers are read by :func:`load_adapter`; a module's tensors are read from
``adapter_model.safetensors`` when :meth:`LoraAdapter.module` is called, so the
engine holds one module of each input at a time.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from registry.errors import BadInputError, NotFoundError, UnsupportedAdapterError
from registry.formats.strict_json import load_json_file
from registry.ingest import (
    CONFIG_NAME,
    MAX_CONFIG_BYTES,
    PICKLE_NAME,
    WEIGHTS_NAME,
    check_adapter_tensors,
)
from registry.formats.peft_keys import LoraKeys, alpha_for, rank_for, validate_lora_config
from registry.formats.safetensors_header import read_header
from merging.targeting import check_targeted

if TYPE_CHECKING:
    import torch

# init_lora_weights values whose initialisation subtracts from the base weights.
_BASE_REWRITING_INITS = ("pissa", "olora", "corda", "loftq")
# Config fields that, when set (truthy), change what the saved tensors mean.
_UNSUPPORTED_FIELDS = {
    "use_dora": "DoRA (use_dora) scales the merged weight by a magnitude vector; its delta "
                "is not s·B·A",
    "lora_bias": "lora_bias adds a trained bias the merge methods do not define",
    "trainable_token_indices": "trainable_token_indices (token adapters) cannot be merged",
    "target_parameters": "target_parameters (LoRA on nn.Parameter) cannot be merged",
    "layer_replication": "layer_replication changes the model structure",
    "alora_invocation_tokens": "aLoRA deltas only apply after their invocation tokens",
    "use_qalora": "QALoRA pools inputs before A",
}


@dataclass(frozen=True)
class ModuleInfo:
    """What the header says about one LoRA module (no tensor data).

    Attributes:
        name: Module path as saved (``base_model.model.model.layers.0.self_attn.q_proj``).
        keys: Tensor names of A and B.
        out_features: Rows of B (``embedding_dim`` for embeddings).
        in_features: Columns of A (``num_embeddings`` for embeddings).
        rank: The module's rank (rows of A).
        alpha: The module's ``lora_alpha``.
        scale: ``alpha / rank`` (``alpha / sqrt(rank)`` with rslora).
        dtype: Safetensors dtype of A/B promoted (``F32`` if they differ).
    """

    name: str
    keys: LoraKeys
    out_features: int
    in_features: int
    rank: int
    alpha: float
    scale: float
    dtype: str

    @property
    def embedding(self) -> bool:
        """True for ``lora_embedding_A``/``_B`` modules."""
        return self.keys.embedding

    @property
    def shape(self) -> tuple[int, int]:
        """``(out_features, in_features)``: the shape of ``B @ A``."""
        return (self.out_features, self.in_features)


@dataclass(frozen=True)
class LoraModule:
    """One module's factors, as stored (dtype unchanged).

    Attributes:
        name: Module path as saved.
        A: ``(r, in)`` tensor.
        B: ``(out, r)`` tensor.
        scale: ``s`` in ``ΔW = s·B·A``.
        info: The header-level description.
    """

    name: str
    A: torch.Tensor
    B: torch.Tensor
    scale: float
    info: ModuleInfo

    def delta(self) -> torch.Tensor:
        """The dense float32 delta ``s·B·A`` of shape ``(out, in)`` (tests, small modules)."""
        return (self.B.float() @ self.A.float()) * self.scale


class _LazyModules(Mapping[str, LoraModule]):
    """Mapping that reads a module's tensors from disk on every access (no cache)."""

    def __init__(self, adapter: LoraAdapter) -> None:
        self._adapter = adapter

    def __getitem__(self, name: str) -> LoraModule:
        return self._adapter.module(name)

    def __iter__(self) -> Iterator[str]:
        return iter(self._adapter.infos)

    def __len__(self) -> int:
        return len(self._adapter.infos)


class LoraAdapter:
    """A validated LoRA adapter directory, read module by module.

    Attributes:
        path: The adapter directory.
        config: The parsed ``adapter_config.json``.
        infos: Module path -> :class:`ModuleInfo`, sorted by path.
        extras: Names of non-LoRA tensors (``modules_to_save`` copies, saved
            embedding ``base_layer`` weights).
        extra_dtypes: Extra tensor name -> safetensors dtype.
    """

    def __init__(self, path: Path, config: dict[str, Any], infos: dict[str, ModuleInfo],
                 extras: list[str], extra_info: dict[str, tuple[str, tuple[int, ...]]]) -> None:
        self.path = path
        self.config = config
        self.infos = infos
        self.extras = extras
        self.extra_info = extra_info
        self._handle: Any = None
        self._lock = threading.Lock()

    def _read(self, *keys: str) -> list[torch.Tensor]:
        """Read tensors through one open ``safe_open`` handle (thread-safe)."""
        with self._lock:
            if self._handle is None:
                from safetensors import safe_open

                self._handle = safe_open(str(self.weights_path), framework="pt")
            return [self._handle.get_tensor(key) for key in keys]

    def close(self) -> None:
        """Drop the open weights file handle (reopened on the next read)."""
        with self._lock:
            self._handle = None

    def __enter__(self) -> LoraAdapter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def weights_path(self) -> Path:
        """``adapter_model.safetensors`` inside :attr:`path`."""
        return self.path / WEIGHTS_NAME

    @property
    def modules(self) -> Mapping[str, LoraModule]:
        """Module path -> :class:`LoraModule`, loaded on access (not cached)."""
        return _LazyModules(self)

    @property
    def dtype(self) -> str:
        """Safetensors dtype of the LoRA factors (``F32`` if they are mixed)."""
        dtypes = {info.dtype for info in self.infos.values()}
        return dtypes.pop() if len(dtypes) == 1 else "F32"

    def module(self, name: str) -> LoraModule:
        """Read one module's A and B.

        Raises:
            NotFoundError: The adapter has no such module.
        """
        info = self.infos.get(name)
        if info is None:
            raise NotFoundError(f"{self.path}: no LoRA module {name!r}", fix="check the module path")
        a, b = self._read(info.keys.a, info.keys.b)
        return LoraModule(name=name, A=a, B=b, scale=info.scale, info=info)

    def extra_tensor(self, key: str) -> torch.Tensor:
        """Read one extra (non-LoRA) tensor such as a ``modules_to_save`` copy."""
        return self._read(key)[0]


def module_scale(rank: int, alpha: float, use_rslora: bool) -> float:
    """PEFT's LoRA scale: ``alpha / sqrt(rank)`` with rslora, else ``alpha / rank``."""
    return alpha / math.sqrt(rank) if use_rslora else alpha / rank


def _refuse_unsupported(config: dict[str, Any], root: Path) -> None:
    for field, why in _UNSUPPORTED_FIELDS.items():
        if config.get(field):
            raise UnsupportedAdapterError(
                f"{root}: {why}; refusing to merge it",
                fix=f"merge adapters trained without {field}",
            )
    init = config.get("init_lora_weights")
    if isinstance(init, str) and init.lower().startswith(_BASE_REWRITING_INITS):
        raise UnsupportedAdapterError(
            f"{root}: init_lora_weights={init!r} rewrites the base weights, so s·B·A is not "
            "this adapter's delta to the original base",
            fix="convert it to a plain LoRA first (PEFT save_pretrained with "
                "path_initial_model_for_weight_conversion)",
        )


def load_adapter(adapter_dir: str | Path) -> LoraAdapter:
    """Open a PEFT LoRA adapter directory for merging (headers only).

    Args:
        adapter_dir: Directory with ``adapter_config.json`` and
            ``adapter_model.safetensors`` (a store version materialized by
            ``Store.materialize`` is one).

    Returns:
        The :class:`LoraAdapter`; tensors are read per module later.

    Raises:
        NotFoundError: The directory does not exist.
        BadInputError: Missing/malformed config or weights, a pickle-only adapter,
            inconsistent shapes or ranks (ingest's checks).
        UnsupportedAdapterError: Not LoRA, DoRA, lora_bias, convolution LoRA,
            base-rewriting initialisations, token adapters, LoRA tensors PEFT would
            not load (:mod:`merging.targeting`).
    """
    root = Path(adapter_dir)
    if not root.is_dir():
        raise NotFoundError(f"adapter directory {root} does not exist", fix="check the path")
    config_path = root / CONFIG_NAME
    weights_path = root / WEIGHTS_NAME
    if not config_path.is_file():
        raise BadInputError(f"{root}: no {CONFIG_NAME}; not a PEFT adapter directory",
                            fix="pass the directory written by PeftModel.save_pretrained")
    config = validate_lora_config(
        load_json_file(config_path, CONFIG_NAME, max_bytes=MAX_CONFIG_BYTES), config_path)
    _refuse_unsupported(config, root)
    if not weights_path.is_file():
        pickled = (root / PICKLE_NAME).is_file()
        raise BadInputError(
            f"{root}: no {WEIGHTS_NAME}" + (f" (only {PICKLE_NAME})" if pickled else ""),
            fix="push it with `adapters push --allow-pickle` (converts to safetensors) and merge "
                "the stored version" if pickled else "save the adapter with save_pretrained",
        )
    header = read_header(weights_path)
    keys, extras = check_adapter_tensors(header, config, weights_path)
    use_rslora = bool(config.get("use_rslora", False))
    infos: dict[str, ModuleInfo] = {}
    for name, k in keys.items():
        if k.magnitude is not None or k.bias is not None:
            raise UnsupportedAdapterError(
                f"{root}: module {name} carries DoRA/lora_bias tensors; refusing to merge it",
                fix="merge plain LoRA adapters")
        a, b = header.tensors[k.a], header.tensors[k.b]
        rank = rank_for(name, config["r"], config.get("rank_pattern"))
        alpha = float(alpha_for(name, config["lora_alpha"], config.get("alpha_pattern")))
        dtype = a.dtype if a.dtype == b.dtype else "F32"
        infos[name] = ModuleInfo(name=name, keys=k, out_features=b.shape[0],
                                 in_features=a.shape[1], rank=rank, alpha=alpha,
                                 scale=module_scale(rank, alpha, use_rslora), dtype=dtype)
    extra_info = {e: (header.tensors[e].dtype, header.tensors[e].shape) for e in extras}
    check_targeted(root, config, infos)  # only what PEFT, and so the gate, loads
    return LoraAdapter(root, config, infos, list(extras), extra_info)

