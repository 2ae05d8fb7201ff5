"""Newton-Schulz orthogonalisation and the Muon update (techniques.md section 3; lessons: the public
implementation's "Muon" gave singular values 0.075 to 651)."""
from __future__ import annotations

import pytest
import torch

from forge.optim.metrics import effective_rank_fraction, ortho_error
from forge.optim.muon import Muon, update_scale
from forge.optim.newton_schulz import newton_schulz, newton_schulz_many, orthogonalize_svd

BAND = (0.68, 1.21)  # five quintic steps, for singular values >= 0.003 ||G||_F


def controlled(rows: int, cols: int, smallest: float, seed: int = 0) -> torch.Tensor:
    """A matrix with singular values log-spaced from 1 down to `smallest` (a gradient-like wide spectrum)."""
    g = torch.Generator().manual_seed(seed)
    r = min(rows, cols)
    u, _ = torch.linalg.qr(torch.randn(rows, r, generator=g))
    v, _ = torch.linalg.qr(torch.randn(cols, r, generator=g))
    return u @ torch.diag(torch.logspace(0, torch.log10(torch.tensor(smallest)).item(), r)) @ v.T


def svals(x: torch.Tensor) -> torch.Tensor:
    return torch.linalg.svdvals(x.float())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(48, 96), (96, 40)])
def test_k5_singular_values_lie_in_the_band(shape, dtype):
    for g in (torch.randn(*shape, generator=torch.Generator().manual_seed(1)), controlled(*shape, 1e-2)):
        assert (svals(g) / g.norm()).min() >= 0.003
        s = svals(newton_schulz(g, 5, dtype))
        assert BAND[0] <= s.min() and s.max() <= BAND[1], (s.min().item(), s.max().item())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_same_shape_matrices_batched_equal_one_by_one(dtype):
    """Muon stacks same-shape matrices into one batched iteration: each result equals that matrix's own
    Newton-Schulz, for wide and tall shapes and a zero matrix among them, in either dtype."""
    shapes = [(32, 64), (64, 32), (32, 64), (16, 16), (64, 32), (32, 64)]
    grads = [controlled(*shape, 1e-2, seed=i) for i, shape in enumerate(shapes)]
    grads[2] = torch.zeros(32, 64)
    batched = newton_schulz_many(grads, 3, dtype)
    for g, out in zip(grads, batched):
        torch.testing.assert_close(out, newton_schulz(g, 3, dtype), atol=1e-6, rtol=1e-5)
        assert out.shape == g.shape and out.dtype == g.dtype
    assert torch.equal(batched[2], grads[2])


def test_output_keeps_shape_and_dtype():
    g = torch.randn(24, 40)
    out = newton_schulz(g, 5, torch.bfloat16)
    assert out.shape == g.shape and out.dtype == torch.float32


@pytest.mark.parametrize("scale", [1e-4, 7.0, 1e4])
def test_scale_invariance(scale):
    g = controlled(32, 64, 1e-2)
    torch.testing.assert_close(newton_schulz(scale * g, 5), newton_schulz(g, 5), atol=1e-5, rtol=1e-4)


def test_transpose_equivariance():
    g = controlled(32, 80, 1e-2)
    torch.testing.assert_close(newton_schulz(g.T, 5), newton_schulz(g, 5).T, atol=1e-5, rtol=1e-4)


def test_ortho_error_falls_from_k3_to_k5():
    g = controlled(48, 96, 1e-2)
    errors = [ortho_error(newton_schulz(g, k), g).item() for k in (1, 3, 4, 5)]
    assert errors[0] > errors[1] > errors[2] > errors[3], errors
    assert errors[0] > 0.5 and errors[3] < 0.35  # the D2 rule's threshold (0.5) separates k=1 from k>=3


def test_ortho_error_reads_the_signal_subspace_only():
    # a rank-8 input: the 40 zero directions cannot be orthogonalised and must not count
    g = controlled(48, 96, 1e-1)[:, :8] @ torch.randn(8, 96, generator=torch.Generator().manual_seed(2))
    assert ortho_error(orthogonalize_svd(g), g) < 1e-4


def test_svd_gives_exact_unit_singular_values():
    for g in (torch.randn(40, 72), controlled(72, 40, 1e-3)):
        s = svals(orthogonalize_svd(g))
        torch.testing.assert_close(s, torch.ones_like(s), atol=1e-5, rtol=0)
        assert ortho_error(orthogonalize_svd(g), g) < 1e-4


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_zero_gradient_gives_zero_update_not_nan(dtype):
    zero = torch.zeros(16, 24)
    assert torch.equal(newton_schulz(zero, 5, dtype), zero)
    assert torch.equal(orthogonalize_svd(zero), zero)


def test_svd_leaves_null_directions_at_zero():
    g = controlled(32, 48, 1e-2)
    low_rank = g[:, :1] @ g[:1, :]  # rank 1
    assert (svals(orthogonalize_svd(low_rank)) > 0.5).sum() == 1


def test_effective_rank_fraction_counts_directions():
    full, rank1 = controlled(32, 48, 1e-1), torch.outer(torch.randn(32), torch.randn(48))
    assert effective_rank_fraction(full) == 1.0
    assert effective_rank_fraction(rank1) == pytest.approx(1 / 32)


def muon_step(grad: torch.Tensor, *, lr=0.1, wd=0.0, beta=0.0, nesterov=False, use_svd=True, steps=5,
              scaling="match_adamw_rms", weight: torch.Tensor | None = None) -> torch.Tensor:
    """The parameter change of one Muon step from `weight` (zeros) with gradient `grad`."""
    p = torch.nn.Parameter(torch.zeros_like(grad) if weight is None else weight.clone())
    opt = Muon([{"params": [p]}], lr=lr, weight_decay=wd, beta=beta, nesterov=nesterov, ns_steps=steps,
               use_svd=use_svd, scaling=scaling, ns_dtype="fp32")
    before = p.detach().clone()
    p.grad = grad.clone()
    opt.step()
    return p.detach() - before


@pytest.mark.parametrize("shape", [(32, 64), (64, 32)])
def test_match_adamw_rms_scaling_gives_update_rms_of_0p2_lr(shape):
    delta = muon_step(torch.randn(*shape), lr=0.1, scaling="match_adamw_rms")
    rms = delta.pow(2).mean().sqrt()
    assert rms.item() == pytest.approx(0.2 * 0.1, rel=1e-5)


def test_keller_scaling():
    assert update_scale(64, 32, "keller") == pytest.approx(2 ** 0.5)
    assert update_scale(32, 64, "keller") == 1.0
    delta = muon_step(torch.randn(64, 16), lr=0.1, scaling="keller")
    o = orthogonalize_svd(torch.randn(64, 16))  # any full-rank polar factor has the same Frobenius norm
    assert delta.norm().item() == pytest.approx(0.1 * 2.0 * o.norm().item(), rel=1e-5)


def test_update_is_minus_lr_scale_ns_of_gradient():
    g = controlled(32, 48, 1e-2)
    delta = muon_step(g, lr=0.05, use_svd=False, steps=5)
    torch.testing.assert_close(delta, -0.05 * update_scale(32, 48, "match_adamw_rms") * newton_schulz(g, 5))


def test_decoupled_weight_decay_scales_by_lr():
    w = torch.randn(8, 12)
    delta = muon_step(torch.zeros(8, 12), lr=0.1, wd=0.5, weight=w)  # zero gradient: only the decay moves w
    torch.testing.assert_close(delta, -0.1 * 0.5 * w)


def test_nesterov_momentum_follows_the_formula():
    """Two steps with gradients g1, g2: the second update orthogonalises (1-b) g2 + b buf, buf = EMA."""
    beta, g1, g2 = 0.9, torch.randn(16, 24), torch.randn(16, 24)
    p = torch.nn.Parameter(torch.zeros(16, 24))
    opt = Muon([{"params": [p]}], lr=1.0, weight_decay=0.0, beta=beta, nesterov=True, ns_steps=5, use_svd=True,
               scaling="keller", ns_dtype="fp32")
    for g in (g1, g2):
        before = p.detach().clone()
        p.grad = g.clone()
        opt.step()
    buf = beta * ((1 - beta) * g1) + (1 - beta) * g2
    expected = -orthogonalize_svd((1 - beta) * g2 + beta * buf)
    torch.testing.assert_close(p.detach() - before, expected, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(opt.state[p]["momentum_buffer"], buf)


def test_muon_rejects_non_matrices():
    with pytest.raises(ValueError, match="2-D"):
        Muon([{"params": [torch.nn.Parameter(torch.zeros(4))]}], lr=1.0, weight_decay=0.0, beta=0.9,
             nesterov=True, ns_steps=5, use_svd=False, scaling="keller", ns_dtype="fp32")
