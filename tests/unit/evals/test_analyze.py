"""moe-merge analyze: Hessian-vector-product terms against exact second derivatives."""

from __future__ import annotations

import pytest
import torch

from moe_merge.evals.analyze import second_order

F64 = torch.float64


def _sq_loss(model, batch):
    x, y = batch
    return ((model(x) - y) ** 2).sum(), y.numel()


def _points(model, k, scale, seed):
    g = torch.Generator().manual_seed(seed)
    base = {n: p.detach().clone() for n, p in model.named_parameters()}
    return [{n: v + scale * torch.randn(v.shape, generator=g, dtype=F64) for n, v in base.items()}
            for _ in range(k)]


def _flat_loss(model, batches):
    """The mean loss as a function of one flat parameter vector (for autograd's Hessian)."""
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for _, p in model.named_parameters()]
    tokens = sum(_sq_loss(model, b)[1] for b in batches)

    def f(flat):
        params, i = {}, 0
        for n, s in zip(names, shapes):
            params[n] = flat[i:i + s.numel()].reshape(s)
            i += s.numel()
        total = sum(((torch.func.functional_call(model, params, (x,)) - y) ** 2).sum()
                    for x, y in batches)
        return total / tokens

    return f, names


def _flat(state, names):
    return torch.cat([state[n].reshape(-1) for n in names])


def _data(seed, n_batches=3, d_in=5, d_out=3):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(7, d_in, generator=g, dtype=F64),
             torch.randn(7, d_out, generator=g, dtype=F64))
            for _ in range(n_batches)]


@pytest.mark.parametrize("weights", [[0.25] * 4, [0.1, 0.2, 0.3, 0.4]])
def test_quadratic_model_matches_exact_second_order_terms(weights):
    """Least squares is exactly quadratic: the HVP terms equal δ_iᵀHδ_j from autograd's full
    Hessian, each checkpoint's loss equals its second-order expansion, and the predicted gain
    equals the measured one, around the merged point or any other."""
    torch.manual_seed(0)
    model = torch.nn.Linear(5, 3).double()
    batches = _data(1)
    pts = _points(model, 4, 0.5, seed=2)
    f, names = _flat_loss(model, batches)
    merged = sum(w * _flat(p, names) for w, p in zip(weights, pts))
    H = torch.autograd.functional.hessian(f, merged)
    deltas = torch.stack([_flat(p, names) - merged for p in pts])
    exact = deltas @ H @ deltas.T

    t = second_order(model, pts, weights, batches, _sq_loss)
    D = torch.tensor(t.D, dtype=F64)
    assert torch.allclose(D, exact, rtol=1e-10, atol=1e-12)
    g = torch.autograd.functional.jacobian(f, merged)
    assert torch.allclose(torch.tensor(t.grad_dot, dtype=F64), deltas @ g, rtol=1e-10, atol=1e-12)
    assert t.loss_merged == pytest.approx(float(f(merged)), rel=1e-12)
    for p, li in zip(t.per_point(), t.loss_points):
        assert p["measured"] == pytest.approx(p["second_order"], abs=1e-10)
        assert li - t.loss_merged == pytest.approx(p["measured"], abs=1e-12)
    assert t.measured_gain > 0
    assert t.predicted_gain == pytest.approx(t.measured_gain, rel=1e-9)
    assert t.predicted_gain_vs_latest == pytest.approx(t.measured_gain_vs_latest, rel=1e-9)
    # around the merged point the weighted deviations cancel: Σ_ij w_i w_j D_ij = 0
    assert abs(t.merged_delta_hessian) < 1e-10 * float(exact.abs().max())

    # expanded around another point (the model's initial weights): the same gain, exactly
    ref = {n: p.detach().clone() for n, p in torch.nn.Linear(5, 3).double().named_parameters()}
    t2 = second_order(model, pts, weights, batches, _sq_loss, reference=ref)
    assert abs(t2.merged_delta_hessian) > 1e-3
    assert t2.predicted_gain == pytest.approx(t.measured_gain, rel=1e-9)
    assert t2.measured_gain == pytest.approx(t.measured_gain, rel=1e-12)
    r = torch.cat([ref[n].reshape(-1) for n in names])
    assert t2.loss_reference == pytest.approx(float(f(r)), rel=1e-12)
    assert t2.predicted_gain_vs_latest == pytest.approx(t.measured_gain_vs_latest, rel=1e-9)
    for p, li in zip(t2.per_point(), t2.loss_points):
        assert li - t2.loss_reference == pytest.approx(p["second_order"], abs=1e-10)


def test_sma_gain_is_the_papers_cross_term_condition():
    """For SMA the gain is (1/2k²)[(k−1)Σ D_ii − Σ_(i≠j) D_ij] (the paper's mechanism)."""
    model = torch.nn.Linear(4, 2).double()
    pts = _points(model, 5, 0.3, seed=3)
    t = second_order(model, pts, [0.2] * 5, _data(4, d_in=4, d_out=2), _sq_loss,
                     reference={n: p.detach() for n, p in model.named_parameters()})
    k = 5
    diag = sum(t.D[i][i] for i in range(k))
    cross = sum(t.D[i][j] for i in range(k) for j in range(k) if i != j)
    assert t.predicted_gain == pytest.approx(((k - 1) * diag - cross) / (2 * k * k), rel=1e-10)
    ct = t.cross_terms()
    assert ct["paper_sma"]["holds"] == (t.predicted_gain > 0) == ct["merging_helps"]
    assert ct["pairs"] == 10
    assert second_order(model, pts, [0.1, 0.1, 0.2, 0.3, 0.3], _data(4, d_in=4, d_out=2),
                        _sq_loss).cross_terms()["paper_sma"] is None


class _Quadratic(torch.nn.Module):
    """L(θ) = ½ θᵀAθ + bᵀθ with a given (possibly indefinite) A: exact algebra as the oracle."""

    def __init__(self, A, b):
        super().__init__()
        self.A, self.b = A, b
        self.theta = torch.nn.Parameter(torch.zeros(len(b), dtype=F64))

    def loss(self, _batch):
        return 0.5 * self.theta @ self.A @ self.theta + self.b @ self.theta, 1


def test_indefinite_curvature_makes_merging_hurt_and_is_measured_exactly():
    """Along a negative-curvature direction the merge is worse than its checkpoints: the
    gain is negative, the cross-terms positive, and every number equals the exact algebra."""
    A = torch.diag(torch.tensor([2.0, -1.0, 0.5], dtype=F64))
    b = torch.tensor([0.3, -0.2, 0.1], dtype=F64)
    model = _Quadratic(A, b)
    # spread mostly along the negative-curvature axis
    thetas = [torch.tensor(v, dtype=F64) for v in ([0.1, 1.0, 0.0], [-0.1, -1.0, 0.2],
                                                   [0.0, 0.5, -0.2])]
    w = [0.5, 0.3, 0.2]
    t = second_order(model, [{"theta": x} for x in thetas], w, [None],
                     lambda m, batch: m.loss(batch))
    merged = sum(wi * x for wi, x in zip(w, thetas))
    deltas = torch.stack([x - merged for x in thetas])
    exact = deltas @ A @ deltas.T
    assert torch.allclose(torch.tensor(t.D, dtype=F64), exact, rtol=1e-12, atol=1e-14)
    g = A @ merged + b
    assert torch.allclose(torch.tensor(t.grad_dot, dtype=F64), deltas @ g, rtol=1e-12)

    def L(x):
        return float(0.5 * x @ A @ x + b @ x)

    gain = sum(wi * L(x) for wi, x in zip(w, thetas)) - L(merged)
    assert gain < 0 and t.measured_gain == pytest.approx(gain, rel=1e-12)
    assert t.predicted_gain == pytest.approx(gain, rel=1e-10)
    ct = t.cross_terms()
    assert not ct["merging_helps"] and ct["paper_sma"] is None
    off = [float(exact[i, j]) for i in range(3) for j in range(i + 1, 3)]
    assert ct["negative"] == sum(x < 0 for x in off)
    cw = sum(w[i] * w[j] * float(exact[i, j]) for i in range(3) for j in range(3) if i != j)
    assert ct["weighted_cross"] == pytest.approx(cw, rel=1e-12)
    cos = t.cosine()
    for i in range(3):
        for j in range(3):
            if exact[i, i] > 0 and exact[j, j] > 0:
                want = float(exact[i, j] / (exact[i, i] * exact[j, j]).sqrt())
                assert cos[i][j] == pytest.approx(want, rel=1e-12)
            else:
                assert cos[i][j] is None
    assert any(c is None for row in cos for c in row)  # some deviation has negative curvature


def test_hessian_vector_products_of_a_nonlinear_model():
    """A tanh MLP: the HVP terms equal the exact Hessian's, the gradient term the exact
    gradient's; the prediction is only second-order accurate, closer for closer checkpoints."""
    torch.manual_seed(5)
    model = torch.nn.Sequential(torch.nn.Linear(3, 6), torch.nn.Tanh(),
                                torch.nn.Linear(6, 2)).double()
    batches = _data(6, d_in=3, d_out=2)
    f, names = _flat_loss(model, batches)
    errors = []
    for scale in (0.1, 0.01):
        pts = _points(model, 3, scale, seed=7)
        w = [0.2, 0.3, 0.5]
        merged = sum(wi * _flat(p, names) for wi, p in zip(w, pts))
        H = torch.autograd.functional.hessian(f, merged)
        deltas = torch.stack([_flat(p, names) - merged for p in pts])
        t = second_order(model, pts, w, batches, _sq_loss)
        assert torch.allclose(torch.tensor(t.D, dtype=F64), deltas @ H @ deltas.T, rtol=1e-9,
                              atol=1e-14)
        g = torch.autograd.functional.jacobian(f, merged)
        assert torch.allclose(torch.tensor(t.grad_dot, dtype=F64), deltas @ g, rtol=1e-9,
                              atol=1e-14)
        errors.append(abs(t.predicted_gain - t.measured_gain) / abs(t.measured_gain))
    assert errors[1] < errors[0] and errors[1] < 0.05


def test_missing_parameter_is_named():
    model = torch.nn.Linear(2, 2).double()
    pts = [{"weight": torch.zeros(2, 2, dtype=F64)}] * 2
    with pytest.raises(ValueError, match="checkpoint 0: no tensor 'bias'"):
        second_order(model, pts, [0.5, 0.5], _data(0, d_in=2, d_out=2), _sq_loss)


