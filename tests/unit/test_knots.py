"""KnOTS alignment (``align="knots"``) against the paper's construction, restated in plain torch.

Reference: SVD of the concatenated dense deltas ``[ΔW_1 | ... | ΔW_n] = U Σ V^T`` (float64,
components above ``σ_max · 2^-23``, each ``u_j`` signed so its largest entry is positive), the
method (PEFT's ``merge_utils.ties``, mergekit's ``breadcrumbs_ties``, or ours with ``B = I``
where masks are random) on the blocks ``C_i`` of ``Σ V^T``, result ``U @ merged``. Inputs have
mixed ranks; the engine test has a module that only one input has.
"""

from __future__ import annotations

import pytest
import torch

from merging.lora.align import knots_basis, knots_merge
from merging.lora.methods import ModuleContext, ModuleInput, get_method
from registry.errors import BadInputError
from tests.support.merge import (PAIR_ONLY_A, PAIR_SHAPES, lora_product, mergekit_merge,
                                 module_deltas, run)

merge_utils = pytest.importorskip("peft.utils.merge_utils")


def paper_knots(deltas, method_ref):  # type: ignore[no-untyped-def]
    """The paper's construction: SVD of [ΔW_1 | ... | ΔW_n], method on Σ V_i^T, U @ merged."""
    cols = deltas[0].shape[1]
    u, s, vh = torch.linalg.svd(torch.cat(deltas, dim=1).double(), full_matrices=False)
    k = int((s > s[0] * 2.0 ** -23).sum())
    u, vh = u[:, :k], vh[:k]
    flip = torch.sign(u[u.abs().argmax(dim=0), torch.arange(k)])  # largest entry of u_j positive
    u, vh = u * flip, vh * flip[:, None]
    sv = (torch.diag(s[:k]) @ vh).float()
    coeffs = list(sv.split(cols, dim=1))
    return u.float() @ method_ref(coeffs), coeffs


def factored(rank_list, shape, seed):  # type: ignore[no-untyped-def]
    gen = torch.Generator().manual_seed(seed)
    return [ModuleInput(i, torch.randn(shape[0], r, generator=gen),
                        torch.randn(r, shape[1], generator=gen), w)
            for i, (r, w) in enumerate(rank_list)]


def knots(method, inputs, name="m", seed=0, **given):  # type: ignore[no-untyped-def]
    spec = get_method(method)
    params = spec.resolve({**given, "align": "knots"}, [inp.weight for inp in inputs])
    shape = (inputs[0].B.shape[0], inputs[0].A.shape[1])
    out = knots_merge(spec, inputs, params, ModuleContext(name, shape, seed))
    return out


@pytest.mark.parametrize("election,peft_mode", [("sum", "total"), ("frequency", "frequency")])
def test_knots_ties_equals_the_paper_construction(election: str, peft_mode: str) -> None:
    inputs = factored([(4, 1.0), (6, 0.5), (2, 0.8)], (40, 24), seed=1)  # mixed ranks
    weights = torch.tensor([inp.weight for inp in inputs])
    deltas = [inp.B @ inp.A for inp in inputs]
    ref, coeffs = paper_knots(deltas, lambda c: merge_utils.ties(c, weights, 0.3, peft_mode))
    out = knots("ties", inputs, density=0.3, sign_election=election)
    assert out.B.shape == (40, 12) and len(coeffs) == 3 and coeffs[0].shape == (12, 24)
    assert torch.allclose(out.B @ out.A, ref, atol=1e-5)
    basis, ours = knots_basis(inputs)
    assert torch.allclose(basis.T @ basis, torch.eye(12), atol=1e-5)
    for inp, c in zip(inputs, ours, strict=True):  # ΔW_i = U C_i exactly
        assert torch.allclose(basis @ c, inp.B @ inp.A, atol=1e-4)


@pytest.mark.parametrize("method", ["dare_ties", "dare_linear", "della", "della_linear"])
def test_knots_random_methods_equal_the_paper_construction(method: str) -> None:
    inputs = factored([(3, 0.9), (5, 0.6)], (130, 20), seed=2)
    deltas = [inp.B @ inp.A for inp in inputs]
    weights = [inp.weight for inp in inputs]
    # our masks on the coefficients depend only on their shape and magnitude ranks, so the
    # plain-torch reference can run the method itself (B = I) on its own coefficients
    ref, _ = paper_knots(deltas, lambda c: run(method, c, weights, name="mod", seed=7, density=0.4,
                                               **({"epsilon": 0.2} if "della" in method else {})))
    out = knots(method, inputs, name="mod", seed=7, density=0.4,
                **({"epsilon": 0.2} if "della" in method else {}))
    assert torch.allclose(out.B @ out.A, ref, atol=1e-5)


def test_knots_breadcrumbs_equals_the_paper_construction_with_mergekit() -> None:
    inputs = factored([(4, 1.0), (8, 0.5)], (33, 50), seed=3)
    deltas = [inp.B @ inp.A for inp in inputs]
    ref, _ = paper_knots(deltas, lambda c: mergekit_merge(
        "breadcrumbs_ties", c, [1.0, 0.5], density=0.5, gamma=0.05, normalize=True, rescale=False))
    out = knots("breadcrumbs_ties", inputs, density=0.5, gamma=0.05, sign_election="mergekit")
    assert torch.allclose(out.B @ out.A, ref, atol=1e-5)


def test_knots_keeping_everything_is_the_linear_merge() -> None:
    inputs = factored([(4, 1.0), (6, -0.5)], (40, 24), seed=4)
    out = knots("magnitude_prune", inputs, density=1.0)
    assert torch.allclose(out.B @ out.A, inputs[0].B @ inputs[0].A - 0.5 * inputs[1].B @ inputs[1].A,
                          atol=1e-4)


def test_knots_single_input_and_zero_delta() -> None:
    inputs = factored([(4, 2.0)], (30, 20), seed=5)
    delta = inputs[0].B @ inputs[0].A
    ref, _ = paper_knots([delta], lambda c: merge_utils.ties(c, torch.tensor([2.0]), 0.5, "total"))
    assert torch.allclose((lambda f: f.B @ f.A)(knots("ties", inputs)), ref, atol=1e-5)
    zero = [ModuleInput(0, torch.zeros(30, 4), torch.randn(4, 20), 1.0)]
    out = knots("ties", zero)
    assert out.B.shape == (30, 1) and float((out.B @ out.A).abs().max()) == 0.0


def test_knots_is_invariant_to_the_deltas_scale() -> None:
    inputs = factored([(4, 1.0), (6, 0.5)], (40, 24), seed=6)
    small = [ModuleInput(i.index, i.B * 1e-6, i.A, i.weight) for i in inputs]
    a = knots("ties", inputs, density=0.4)
    b = knots("ties", small, density=0.4)
    assert torch.allclose((b.B @ b.A) * 1e6, a.B @ a.A, atol=1e-4, rtol=1e-4)


def test_engine_knots(adapter_pair) -> None:  # type: ignore[no-untyped-def]
    from merging.lora.engine import merge_adapters

    a, b = adapter_pair
    res = merge_adapters([a, b], [1.0, 0.5], "dare_ties", params={"density": 0.5, "align": "knots"},
                         seed=3)
    assert res.report["parameters"]["align"] == "knots"
    assert res.report["error"] < 1e-5  # exact factors: (basis, merged coefficients)
    da, db = module_deltas(a, PAIR_SHAPES), module_deltas(b, PAIR_SHAPES)
    for name in PAIR_SHAPES:
        deltas = [d[name] for d in (da, db) if name in d]
        weights = [1.0, 0.5][:len(deltas)]
        ref, _ = paper_knots(deltas, lambda c, weights=weights, name=name: run("dare_ties", c, weights,
                                                   name=f"base_model.model.{name}", seed=3,
                                                   density=0.5))
        assert torch.allclose(lora_product(res, name), ref, atol=1e-4), name
    modules = res.report["modules"]
    assert modules[f"base_model.model.{PAIR_ONLY_A}"]["rank"] <= 4
    assert max(m["rank"] for m in modules.values()) <= 10
    again = merge_adapters([a, b], [1.0, 0.5], "dare_ties",
                           params={"density": 0.5, "align": "knots"}, seed=3)
    assert all(torch.equal(again.tensors[k], v) for k, v in res.tensors.items())
    other = merge_adapters([a, b], [1.0, 0.5], "dare_ties",
                           params={"density": 0.5, "align": "knots"}, seed=4)
    assert not all(torch.equal(other.tensors[k], v) for k, v in res.tensors.items())
    truncated = merge_adapters([a, b], [1.0, 0.5], "ties", params={"align": "knots"}, rank=3)
    assert {m["rank"] for m in truncated.report["modules"].values()} == {3}
    with pytest.raises(BadInputError, match="does not apply to method linear"):
        merge_adapters([a, b], None, "linear", params={"align": "knots"})
