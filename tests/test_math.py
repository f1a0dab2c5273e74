"""Exact values of the method's math on hand-written tensors."""

import math

import pytest
import torch

from ray_unlearn import diffusion, surgery


def test_surrogate_eps_identity():
    x_f = torch.tensor([[0.5, -1.0, 0.25]])
    x_s = torch.tensor([[0.0, -0.5, 0.75]])
    eps = torch.tensor([[0.1, 0.2, -0.3]])
    ab = torch.tensor([0.8])
    got = diffusion.surrogate_eps(eps, x_f, x_s, ab)
    # eps + sqrt(0.8/0.2) * (x_f - x_s) = eps + 2 * (0.5, -0.5, -0.5)
    assert torch.allclose(got, torch.tensor([[1.1, -0.8, -1.3]]), atol=1e-6)
    # the same noise re-creates x_t^f from the surrogate: x_t^f = sqrt(ab) x_s + sqrt(1-ab) eps_s
    x_t = diffusion.add_noise(x_f, eps, ab)
    assert torch.allclose(diffusion.add_noise(x_s, got, ab), x_t, atol=1e-6)


def test_surrogate_eps_equals_identity_with_surrogate_noise():
    ab = torch.tensor([0.3, 0.9])
    x_f, x_s, eps = torch.randn(2, 4), torch.randn(2, 4), torch.randn(2, 4)
    x_t = diffusion.add_noise(x_f, eps, ab)
    direct = (x_t - ab.sqrt()[:, None] * x_s) / (1 - ab).sqrt()[:, None]
    assert torch.allclose(diffusion.surrogate_eps(eps, x_f, x_s, ab), direct, atol=1e-5)


def test_surrogate_velocity_rectified_flow():
    z_f, z_s, eps = torch.tensor([[1.0, 2.0]]), torch.tensor([[0.0, 1.0]]), torch.tensor([[0.5, -0.5]])
    s = torch.tensor([0.25])
    x_t = (1 - s) * z_f + s * eps
    v_s = diffusion.surrogate_velocity(x_t, z_s, s)
    # (0.75*z_f + 0.25*eps - z_s) / 0.25 = (0.875 - 0, 1.375 - 1) / 0.25
    assert torch.allclose(v_s, torch.tensor([[3.5, 1.5]]))
    # reduces to eps - z_s when the target equals the surrogate
    assert torch.allclose(diffusion.surrogate_velocity((1 - s) * z_s + s * eps, z_s, s), eps - z_s)


def test_beta_weight_endpoints_and_shape():
    t = torch.tensor([0, 999, 333])
    w = diffusion.forget_weight(t, 1000, "beta", beta=2.0)
    assert w[0] == 0.0 and w[1] == 1.0  # t=0: only remember; t=T: only forget
    assert math.isclose(float(w[2]), (333 / 999) ** 2, rel_tol=1e-6)
    assert torch.equal(diffusion.forget_weight(t, 1000, "beta", beta=0.0), torch.ones(3))


def test_constant_weight():
    w = diffusion.forget_weight(torch.tensor([0, 500, 999]), 1000, "constant", lam=0.3)
    assert torch.allclose(w, torch.full((3,), 0.3))
    with pytest.raises(ValueError, match="weighting"):
        diffusion.forget_weight(torch.tensor([1]), 1000, "linear")


def test_surgery_keeps_gf_when_aligned():
    g_f = [torch.tensor([1.0, 2.0]), torch.tensor([3.0])]
    g_r = [torch.tensor([1.0, 0.0]), torch.tensor([1.0])]  # <g_f,g_r> = 4 >= 0
    out, logs = surgery.combine(g_f, g_r, "project_forget")
    assert torch.equal(out[0], torch.tensor([2.0, 2.0])) and torch.equal(out[1], torch.tensor([4.0]))
    assert logs["surgery/conflict"] == 0.0


def test_surgery_orthogonal_when_conflicting():
    g_f = [torch.tensor([-1.0, 1.0]), torch.tensor([0.0])]
    g_r = [torch.tensor([1.0, 0.0]), torch.tensor([1.0])]  # <g_f,g_r> = -1, ||g_r||^2 = 2
    projected = surgery.project_conflict(g_f, g_r)
    # g_f - (-1/2) g_r = (-0.5, 1.0 | 0.5)
    assert torch.allclose(projected[0], torch.tensor([-0.5, 1.0])) and torch.allclose(projected[1], torch.tensor([0.5]))
    assert abs(float(surgery.dot(projected, g_r))) < 1e-12
    out, logs = surgery.combine(g_f, g_r, "project_forget")
    assert torch.allclose(out[0], torch.tensor([0.5, 1.0])) and torch.allclose(out[1], torch.tensor([1.5]))
    assert logs["surgery/conflict"] == 1.0 and logs["surgery/cos"] < 0


def test_pcgrad_projects_both():
    g_f = [torch.tensor([-1.0, 1.0])]
    g_r = [torch.tensor([1.0, 0.0])]  # dot -1; |g_f|^2 = 2, |g_r|^2 = 1
    out, _ = surgery.combine(g_f, g_r, "pcgrad")
    # g_f' = g_f + g_r = (0, 1); g_r' = g_r + 0.5 g_f = (0.5, 0.5); sum = (0.5, 1.5)
    assert torch.allclose(out[0], torch.tensor([0.5, 1.5]))


def test_surgery_none_is_plain_sum():
    out, _ = surgery.combine([torch.tensor([-1.0])], [torch.tensor([1.0])], "none")
    assert torch.equal(out[0], torch.tensor([0.0]))
    with pytest.raises(ValueError, match="surgery mode"):
        surgery.combine([torch.tensor([1.0])], [torch.tensor([1.0])], "both")
