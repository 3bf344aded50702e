"""cholqr: CholeskyQR2 bases against Householder QR (torch.linalg.qr), fallbacks included."""

from __future__ import annotations

import pytest
import torch

from merging.lora import cholqr
from merging.lora.cholqr import orthonormal_columns


def tall(rows: int, cols: int, seed: int, cond: float = 10.0) -> torch.Tensor:
    """A float32 ``rows x cols`` matrix with singular values spread from 1 to ``1/cond``."""
    gen = torch.Generator().manual_seed(seed)
    u = torch.linalg.qr(torch.randn(rows, cols, generator=gen, dtype=torch.float64)).Q
    v = torch.linalg.qr(torch.randn(cols, cols, generator=gen, dtype=torch.float64)).Q
    s = torch.logspace(0, -torch.log10(torch.tensor(cond)).item(), cols, dtype=torch.float64)
    return ((u * s) @ v.T).float()


def projector(Q: torch.Tensor) -> torch.Tensor:
    return Q.double() @ Q.double().mT


def count_householder(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    calls: list[int] = []
    real = torch.linalg.qr

    def counted(x: torch.Tensor, *args, **kwargs):  # type: ignore[no-untyped-def]
        calls.append(x.shape[0])
        return real(x, *args, **kwargs)

    monkeypatch.setattr(cholqr.torch.linalg, "qr", counted)
    return calls


@pytest.mark.parametrize("cond", [1.0, 1e3, 1e6])
def test_same_span_as_householder_and_orthonormal(cond: float, monkeypatch: pytest.MonkeyPatch) -> None:
    Y = torch.stack([tall(700, 32, seed=s, cond=cond) for s in range(3)])
    expected = torch.linalg.qr(Y.double()).Q
    calls = count_householder(monkeypatch)
    Q = orthonormal_columns(Y)
    assert calls == []  # full numerical rank: no fallback, batched kernels only
    assert Q.dtype == torch.float32 and Q.shape == Y.shape
    eye = torch.eye(32, dtype=torch.float64)
    assert float((Q.double().mT @ Q.double() - eye).abs().max()) < 1e-6
    # the same column space: equal orthogonal projectors (up to float32 rounding of Y)
    assert float((projector(Q) - projector(expected)).abs().max()) < 1e-5 * max(cond, 1.0) ** 0.5


def test_zero_and_rank_deficient_matrices_fall_back_to_householder(
        monkeypatch: pytest.MonkeyPatch) -> None:
    good = tall(300, 8, seed=1)
    low = torch.zeros(300, 8)
    low[:5, :3] = torch.randn(5, 3, generator=torch.Generator().manual_seed(2))  # rank 3, exact zeros
    Y = torch.stack([good, torch.zeros(300, 8), low])
    calls = count_householder(monkeypatch)
    Q = orthonormal_columns(Y)
    assert calls == [2]  # one Householder call, for the two matrices CholeskyQR cannot take
    assert torch.isfinite(Q).all()
    eye = torch.eye(8, dtype=torch.float64)
    for q in Q:
        assert float((q.double().mT @ q.double() - eye).abs().max()) < 1e-6
    # the rank-3 matrix's columns lie in the basis
    assert float((projector(Q[2]) @ low.double() - low.double()).abs().max()) < 1e-6
    monkeypatch.undo()
    torch.testing.assert_close(projector(Q[0]), projector(orthonormal_columns(good[None])[0]))


def test_deterministic() -> None:
    Y = torch.stack([tall(500, 16, seed=s, cond=1e4) for s in range(2)])
    assert torch.equal(orthonormal_columns(Y), orthonormal_columns(Y))


@pytest.mark.parametrize("shape", [(5, 4), (2, 3, 4), (1, 2, 3, 4)])
def test_bad_shapes_are_refused(shape: tuple[int, ...]) -> None:
    with pytest.raises(ValueError):
        orthonormal_columns(torch.zeros(shape))
