"""``adapters unload`` and ``adapters quantize``: write standalone model directories.

``unload REF --base MODEL_DIR --out OUT_DIR`` bakes an adapter (a registry ref, or a
PEFT adapter directory written as a path, ``./NAME``: the rule of
:func:`registry.ref_or_dir.resolve_ref_or_dir`) into its base with :func:`merging.model.unload.unload`;
``quantize MODEL_DIR --to nf4|fp4|int8 --out OUT_DIR`` writes a bitsandbytes copy
with :func:`merging.model.quantize.quantize`. Both stream tensor by tensor, write into a
temp directory renamed at the end, and (for a stored adapter, or with ``--name``)
record the output in the store by reference with its lineage.

``rebuild REF --base BASE_DIR --out DIR`` re-runs a recorded derived model's recipe
through its lineage (:func:`merging.model.rebuild.rebuild`: unload and/or quantize with the
recorded parameters) and publishes ``DIR`` only when its weights equal the record bit
for bit: exit 3 naming the first differing tensor (and the library versions that
differ from the recorded ones), exit 4 for a non-empty ``--out`` (nothing written),
exit 2 for a base that is not the recorded one.

torch, transformers and bitsandbytes are imported inside the commands only.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Optional

import typer

from cli.common import DeviceOpt, JsonOpt, StoreOpt, open_store, ref_or_dir
from cli.output import Output, escape, make_table, short_digest

if TYPE_CHECKING:
    from merging.model.results import UnloadResult

MAX_ROWS = 12


def register(app: typer.Typer) -> None:
    """Add ``unload``, ``quantize`` and ``rebuild`` to ``app``."""
    app.command("unload")(unload)
    app.command("quantize")(quantize)
    app.command("rebuild")(rebuild)


ShardOpt = Annotated[Optional[str], typer.Option(
    "--max-shard-size", help="Reshard the output, e.g. 2GB (default: keep the base's files).")]
DoubleQuantOpt = Annotated[bool, typer.Option(
    "--double-quant", help="4-bit: also quantize the absmax statistics.")]
BlocksizeOpt = Annotated[int, typer.Option("--blocksize", help="4-bit block size.")]
SyncOpt = Annotated[bool, typer.Option(
    "--sync/--no-sync", help="fsync the output before publishing it; --no-sync is for scratch "
                             "output (faster; a power cut may leave truncated files).")]
ProbeOpt = Annotated[Optional[bool], typer.Option(
    "--probe/--no-probe", help="Measure logits drift of a quantized output (default: models "
                               "up to 2 GiB).", show_default=False)]


def unload(
    ref: Annotated[str, typer.Argument(help="Adapter: registry ref, or a PEFT adapter directory written as a path (./DIR).")],
    base: Annotated[Path, typer.Option("--base", help="Base model directory.")],
    out: Annotated[Path, typer.Option("--out", help="Output directory (new or empty).")],
    max_shard_size: ShardOpt = None,
    quantize: Annotated[Optional[str], typer.Option(
        "--quantize", help="Also quantize the merged model: nf4, fp4 or int8.")] = None,
    qlora: Annotated[bool, typer.Option(
        "--qlora", help="Adapter trained on a 4-bit base: merge into dequantize(quantize(W)).")
    ] = False,
    double_quant: DoubleQuantOpt = False,
    blocksize: BlocksizeOpt = 64,
    name: Annotated[Optional[str], typer.Option(
        "--name", help="Record the output under this name (default for a stored adapter: "
                       "<name>-unloaded, or <name>-unloaded-<method> with --quantize).")] = None,
    probe: ProbeOpt = None,
    sync: SyncOpt = True,
    device: DeviceOpt = "auto",
    json_out: JsonOpt = False,
    store: StoreOpt = None,
) -> None:
    """Merge an adapter into its base and write a model that loads without PEFT."""
    from merging.model.unload import unload as run_unload

    st, adapter = ref_or_dir(ref, store)
    if isinstance(adapter, Path):  # a directory: the store only records the output (--name)
        st = open_store(store) if name else None
    _rewrite(json_out, f"unloading into {out.name}", base, lambda advance: run_unload(
        adapter, base, out, store=st, max_shard_size=max_shard_size,
        quantize=quantize, qlora=qlora, double_quant=double_quant, blocksize=blocksize,
        name=name, probe=probe, progress=advance, sync=sync, device=device))


def quantize(
    model_dir: Annotated[Path, typer.Argument(help="Model directory (safetensors).")],
    to: Annotated[str, typer.Option("--to", help="nf4, fp4 or int8.")],
    out: Annotated[Path, typer.Option("--out", help="Output directory (new or empty).")],
    double_quant: DoubleQuantOpt = False,
    blocksize: BlocksizeOpt = 64,
    max_shard_size: ShardOpt = None,
    name: Annotated[Optional[str], typer.Option(
        "--name", help="Record the output in the store under this name.")] = None,
    probe: ProbeOpt = None,
    sync: SyncOpt = True,
    device: DeviceOpt = "auto",
    json_out: JsonOpt = False,
    store: StoreOpt = None,
) -> None:
    """Write a bitsandbytes-quantized copy that from_pretrained loads as Linear4bit/8bitLt."""
    from merging.model.quantize import quantize as run_quantize

    st = open_store(store) if name else None
    _rewrite(json_out, f"quantizing into {out.name}", model_dir, lambda advance: run_quantize(
        model_dir, to, out=out, double_quant=double_quant, blocksize=blocksize,
        max_shard_size=max_shard_size, probe=probe, store=st, name=name, progress=advance,
        sync=sync, device=device))


def rebuild(
    ref: Annotated[str, typer.Argument(help="Derived model to rebuild (any ref).")],
    base: Annotated[Path, typer.Option("--base", help="Base model directory the recipe started from.")],
    out: Annotated[Path, typer.Option("--out", help="Output directory (new or empty).")],
    sync: SyncOpt = True,
    json_out: JsonOpt = False,
    store: StoreOpt = None,
) -> None:
    """Re-run a derived model's recorded recipe and check the result bit for bit."""
    from merging.model.layout import read_layout
    from merging.model.rebuild import rebuild as run_rebuild

    st = open_store(store)
    output = Output(json_out)
    total = read_layout(base).total_bytes if base.is_dir() else None
    with output.progress(f"rebuilding into {out.name}", total) as advance:
        result = run_rebuild(st, ref, base, out, progress=advance, sync=sync)
    data = result.to_json()

    def render(console: Any) -> None:
        steps = " then ".join(s["method"] for s in data["steps"])
        console.print(f"OK: rebuilt {escape(result.ref)} ({steps}) into {escape(result.out_dir)}: "
                      f"{result.tensors} tensors, weights {short_digest(result.weights_digest)} "
                      "bit-identical to the record")
        for diff in result.environment_differences:
            console.print(f"note: environment differs from the recorded one: {escape(diff)}")

    output.emit(data, render)


def _rewrite(json_out: bool, label: str, source_dir: Path,
             run: Callable[[Callable[[int], None]], UnloadResult]) -> None:
    """Run an unload/quantize with a progress bar over ``source_dir``'s bytes; render."""
    from merging.model.layout import read_layout

    output = Output(json_out)
    with output.progress(label, read_layout(source_dir).total_bytes) as advance:
        result = run(advance)
    data = result.to_json()
    output.emit(data, lambda console: _render(console, data))


def _fmt(value: Any) -> str:
    return "" if value is None else f"{value:.4g}" if isinstance(value, float) else str(value)


def _render(console: Any, data: dict[str, Any]) -> None:
    console.print(f"wrote {data['tensors']} tensors, {data['total_bytes']:,} bytes in "
                  f"{len(data['files'])} file(s) to {escape(data['out_dir'])}")
    for note in data["notes"]:
        console.print(f"note: {escape(note)}")
    modules = sorted(data["modules"], key=lambda m: -(m["delta_fro"] or 0.0))
    if modules:
        rows = [(escape(m["name"]), m["kind"], _fmt(m["delta_fro"]), _fmt(m["weight_fro"]),
                 _fmt(m["quant_rel_error"])) for m in modules[:MAX_ROWS]]
        title = f"{len(modules)} changed tensors" + (
            f" (largest {MAX_ROWS} deltas)" if len(modules) > MAX_ROWS else "")
        console.print(make_table(title, ["tensor", "kind", "|delta|_F", "|W|_F", "quant err"],
                                 rows))
    quant = data.get("quantization")
    if quant:
        where = f" on {quant['device']}" if quant.get("device") else ""  # absent: the CPU
        console.print(f"quantized {quant['method']}{where}: overall relative error "
                      f"{quant['overall_rel_error']:.4g}")
    probe = data.get("probe")
    if probe:
        if "skipped" in probe:
            console.print(f"logits drift: skipped ({escape(probe['skipped'])})")
        else:
            console.print(f"logits drift vs unquantized: max |d| {probe['max_abs']:.4g}, "
                          f"relative {probe['relative_fro']:.4g}, top-1 agreement "
                          f"{probe['top1_agreement']:.3f}")
    fingerprint = data.get("output_fingerprint")
    if fingerprint:
        console.print(f"weights digest {short_digest(fingerprint['weights_digest'])}")
    version = data.get("version")
    if version:
        state = "recorded" if version["created"] else "already recorded"
        console.print(f"{state}: {escape(version['ref'])}")
