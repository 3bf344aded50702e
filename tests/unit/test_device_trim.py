"""device_trim: TIES / magnitude_prune of module groups equal today's methods bit for bit (CPU)."""

from __future__ import annotations

import pytest
import torch

from merging.lora.device_trim import group_by_shape, group_deltas, host_copy, merge_group
from merging.lora.group_steps import band_group, dare_masks, trim_group
from merging.lora.sparsify import dare_mask
from merging.lora.methods import Factors, MergeParams, ModuleContext, ModuleInput
from merging.lora.methods.magnitude_prune import magnitude_prune
from merging.lora.methods.ties import ties


def dense(result: Factors | torch.Tensor) -> torch.Tensor:
    """A dense method's result (ties and magnitude_prune return the merged delta)."""
    assert isinstance(result, torch.Tensor)
    return result


def integer_inputs(rows: int, cols: int, seed: int, weights: list[float]) -> list[ModuleInput]:
    """Inputs with small-integer factors: exact products, so block and full matmuls agree."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for index, weight in enumerate(weights):
        rank = 3 + index
        b = torch.randint(-3, 4, (rows, rank), generator=gen).float()
        a = torch.randint(-3, 4, (rank, cols), generator=gen).float()
        out.append(ModuleInput(index=index, B=b, A=a, weight=weight))
    return out


@pytest.mark.parametrize("mode", ["sum", "frequency", "mergekit"])
@pytest.mark.parametrize(("rows", "cols"), [(70, 50), (1100, 1000)])
def test_ties_group_equals_ties_per_module(mode: str, rows: int, cols: int) -> None:
    # Three modules with ranks 3 and 4: equal shapes across the group, as merge_group requires.
    group = [integer_inputs(rows, cols, seed, [0.7, 0.3]) for seed in (1, 2, 3)]
    params = MergeParams(density=0.3, lam=1.5, sign_election=mode, weight_sum=1.0)
    merged = merge_group(group, params, elect=True, device="cpu")
    assert merged.shape == (3, rows, cols)
    for m, inputs in enumerate(group):
        ctx = ModuleContext(name=f"layers.{m}.q_proj", shape=(rows, cols), seed=0)
        assert torch.equal(merged[m], dense(ties(inputs, params, ctx)))


@pytest.mark.parametrize("normalize", [False, True])
def test_magnitude_prune_group_equals_per_module(normalize: bool) -> None:
    group = [integer_inputs(60, 40, seed, [0.5, 2.0, -1.0]) for seed in (4, 5)]
    params = MergeParams(density=0.45, lam=0.8, normalize=normalize, weight_sum=1.5)
    merged = merge_group(group, params, elect=False, device="cpu")
    for m, inputs in enumerate(group):
        ctx = ModuleContext(name=f"m{m}", shape=(60, 40), seed=0)
        assert torch.equal(merged[m], dense(magnitude_prune(inputs, params, ctx)))


def test_float_factors_are_todays_ties_bit_for_bit_on_the_cpu() -> None:
    gen = torch.Generator().manual_seed(6)
    inputs = [ModuleInput(index=i, B=torch.randn(300, 8, generator=gen),
                          A=torch.randn(8, 200, generator=gen), weight=w)
              for i, w in enumerate([0.6, 0.4])]
    params = MergeParams(density=0.5)
    ours = merge_group([inputs], params, elect=True, device="cpu")[0]
    today = dense(ties(inputs, params, ModuleContext(name="m", shape=(300, 200), seed=0)))
    assert torch.equal(ours, today)  # CPU deltas are sparsify's 64-row block products


def test_trim_keeps_exactly_the_top_count_and_density_one_keeps_all() -> None:
    deltas = torch.randn(2, 3, 50, 40, generator=torch.Generator().manual_seed(7))
    trimmed = trim_group(deltas.clone(), 0.25)
    assert (trimmed != 0).reshape(6, -1).sum(1).tolist() == [500] * 6
    assert torch.equal(trim_group(deltas.clone(), 1.0), deltas)


def test_band_keeps_the_k_magnitudes_after_the_outliers() -> None:
    """Against a sort: the band is ranks top+1 .. top+k of |x| (distinct magnitudes)."""
    deltas = torch.randn(2, 3, 30, 20, generator=torch.Generator().manual_seed(8))
    n, k, top = 600, int(0.4 * 600), int(0.05 * 600)
    banded = band_group(deltas.clone(), 0.4, 0.05)
    for ref, got in zip(deltas.reshape(6, -1), banded.reshape(6, -1), strict=True):
        order = ref.abs().argsort(descending=True)
        kept = torch.zeros(n, dtype=torch.bool)
        kept[order[top:top + k]] = True
        assert torch.equal(got, torch.where(kept, ref, torch.zeros(())))
    assert torch.equal(band_group(deltas.clone(), 1.0, 0.3), deltas)  # density 1 ignores gamma
    assert int((band_group(deltas.clone(), 0.9, 0.5) != 0).sum()) == 6 * 540  # top = n - k


def test_dare_masks_are_the_per_module_masks() -> None:
    group = [integer_inputs(150, 20, seed, [1.0, 1.0]) for seed in (1, 2)]
    contexts = [ModuleContext(name=f"layers.{m}.v_proj", shape=(150, 20), seed=9) for m in range(2)]
    keep = dare_masks(group, contexts, 0.3)
    assert keep.shape == (2, 2, 150, 20) and keep.dtype == torch.bool
    for m in range(2):
        for i in range(2):
            assert torch.equal(keep[m, i].float(), dare_mask(contexts[m], group[m][i].index, 0.3))
    assert 0.25 < float(keep.float().mean()) < 0.35


def test_device_draws_are_the_masks_uniforms_and_are_kept(monkeypatch: pytest.MonkeyPatch) -> None:
    """Off the CPU, DARE compares draws kept between merges: they must be the CPU masks'
    own uniforms, be drawn once per (seed, module, input, shape, device), and stay within
    their byte bound (the CPU stands in for the device here; CUDA: test_gpu_paths)."""
    from merging.lora import group_steps

    cache = group_steps._DrawCache(limit=2 * 150 * 20 * 4)  # two (150, 20) float32 draws
    monkeypatch.setattr(group_steps, "DEVICE_DRAWS", cache)
    drawn: list[int] = []
    real = group_steps._draw_blocks
    monkeypatch.setattr(group_steps, "_draw_blocks",
                        lambda pairs, out, fill: (drawn.append(len(pairs)), real(pairs, out, fill)))
    group = [integer_inputs(150, 20, seed, [1.0, 1.0]) for seed in (1, 2)]
    contexts = [ModuleContext(name=f"layers.{m}.v_proj", shape=(150, 20), seed=9) for m in range(2)]
    cpu = torch.device("cpu")
    draws = group_steps.device_draws(group[:1], contexts[:1], cpu)
    assert torch.equal(draws < 0.3, dare_masks(group[:1], contexts[:1], 0.3))
    assert torch.equal(group_steps.device_draws(group[:1], contexts[:1], cpu), draws)
    assert drawn == [2, 2]  # dare_masks draws its own; the second device_draws hits the cache
    both = group_steps.device_draws(group, contexts, cpu)  # module 1: two more, evicting module 0
    assert drawn == [2, 2, 2] and torch.equal(both[0], draws[0]) and cache.used == cache.limit
    assert len(cache.kept) == 2 and all(k[1] == "layers.1.v_proj" for k in cache.kept)


@pytest.mark.parametrize("method", ["dare_ties", "dare_linear", "breadcrumbs", "breadcrumbs_ties"])
def test_grouped_forms_equal_their_methods_bit_for_bit(method: str) -> None:
    from merging.lora.methods import get_method

    spec = get_method(method)
    assert spec.grouped is not None
    group = [integer_inputs(130, 40, seed, [0.7, -0.4]) for seed in (1, 2, 3)]
    given = {"density": 0.35, "lambda": 1.2, **({"gamma": 0.1} if "gamma" in spec.params else {})}
    params = spec.resolve(given, [0.7, -0.4])
    contexts = [ModuleContext(name=f"layers.{m}.up_proj", shape=(130, 40), seed=4) for m in range(3)]
    merged = merge_group(group, params, elect=spec.grouped.elect, device="cpu",
                         select=spec.grouped.select, contexts=contexts)
    for m, inputs in enumerate(group):
        assert torch.equal(merged[m], dense(spec.fn(inputs, params, contexts[m]))), m


def test_bad_groups_are_refused() -> None:
    with pytest.raises(ValueError):
        group_deltas([], "cpu")
    with pytest.raises(ValueError):
        group_deltas([integer_inputs(10, 8, 1, [1.0, 1.0]), integer_inputs(10, 8, 2, [1.0])], "cpu")
    with pytest.raises(ValueError):
        group_deltas([integer_inputs(10, 8, 1, [1.0]), integer_inputs(10, 9, 2, [1.0])], "cpu")


def test_group_by_shape_bounds_groups_and_separates_kinds() -> None:
    shapes = {"a.q": (4, 4), "b.q": (4, 4), "c.q": (4, 4), "a.up": (8, 4), "b.up": (8, 4)}
    assert group_by_shape(shapes, 32) == [["a.q", "b.q"], ["a.up"], ["b.up"], ["c.q"]]
    inputs_of = {"a.q": (0, 1), "b.q": (0,), "c.q": (0, 1), "a.up": (0, 1), "b.up": (0, 1)}
    assert group_by_shape(shapes, 10_000, inputs_of) == [["a.q", "c.q"], ["a.up", "b.up"], ["b.q"]]
    assert group_by_shape(shapes, 1) == [["a.q"], ["a.up"], ["b.q"], ["b.up"], ["c.q"]]


def test_host_copy_of_a_column_major_factor_is_row_major_with_its_own_storage(tmp_path) -> None:
    """A batched SVD's U is column-major (LAPACK, cuSOLVER): a slice of it is a strided
    view that safetensors refuses; the copy the device path returns writes and reads back."""
    from safetensors.torch import load_file, save_file

    u = torch.linalg.svd(torch.randn(3, 40, 90, generator=torch.Generator().manual_seed(0)),
                         full_matrices=False)[0] * 2.0  # element-wise ops keep the layout
    view = u[1]
    assert not view.is_contiguous()
    with pytest.raises(ValueError, match="non contiguous"):
        save_file({"b": view}, str(tmp_path / "refused.safetensors"))
    copy = host_copy(view)
    assert copy.is_contiguous() and copy.device.type == "cpu" and torch.equal(copy, view)
    assert copy.untyped_storage().data_ptr() != u.untyped_storage().data_ptr()
    save_file({"b": copy}, str(tmp_path / "ok.safetensors"))
    assert torch.equal(load_file(str(tmp_path / "ok.safetensors"))["b"], view)
