"""learned_sparsity.py's straight-through selection against hand formulas, finite differences and Eq. 2's
reference form (sparse_attention.sparse_attention, itself tested against python loops)."""
import torch

from learned_sparsity import BONUS_LIMIT, probe_bonus, soft_masked_attention, straight_through_mask
from sparse_attention import sparse_attention


def qkv(b=2, h=4, hkv=2, seq=10, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, n, seq, d, generator=g, dtype=torch.float64) for n in (h, hkv, hkv)]


def test_soft_masked_attention_with_binary_masks_is_eq2():
    q, k, v = qkv()
    m = torch.rand(2, 10, generator=torch.Generator().manual_seed(1)) < 0.6  # (B, L)
    m[:, -1] = True
    want = sparse_attention(q, k, v, m, m, scale=8 ** -0.5)  # (B, H, L, D)
    got = soft_masked_attention(q, k, v, m.double(), m.double(), torch.ones_like(m), 8 ** -0.5)
    assert torch.allclose(got, want, rtol=1e-10, atol=1e-12 * want.abs().max().item())
    unreachable = torch.ones_like(m)
    unreachable[:, 0] = False  # a padding key: out of every softmax whatever m says
    m_pad = m.clone()
    m_pad[:, 0] = False
    want = sparse_attention(q, k, v, m_pad, m_pad, scale=8 ** -0.5)
    got = soft_masked_attention(q, k, v, m_pad.double(), torch.where(m_pad, 1.0, 0.0).double() + ~unreachable,
                                unreachable, 8 ** -0.5)
    assert torch.allclose(got, want, rtol=1e-10, atol=1e-12 * want.abs().max().item())


def test_soft_masked_attention_mask_gradient_matches_finite_differences():
    """∂/∂m_j of a_ij = m_j e^{s_ij} / Σ m e^s at a kept and at a dropped key (m_j = 0 still has a gradient)."""
    q, k, v = qkv(seed=2)
    m = (torch.rand(2, 10, generator=torch.Generator().manual_seed(3)) < 0.5).double()
    m[:, -1] = 1.0
    w = torch.randn(q.shape, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    reach = torch.ones(2, 10, dtype=torch.bool)

    def f(mk):
        return (soft_masked_attention(q, k, v, m, mk, reach, 8 ** -0.5) * w).sum()

    mk = m.clone().requires_grad_(True)
    f(mk).backward()
    for j in (int(m[0].argmin()), int(m[0, :-1].argmax())):  # a dropped key, a kept key
        step = torch.zeros_like(m)
        step[0, j] = 1e-6
        numeric = (f(m + step) - f(m - step)) / 2e-6
        assert abs(mk.grad[0, j] - numeric) <= 1e-6 * max(1.0, abs(numeric.item()))
    assert mk.grad[0, int(m[0].argmin())] != 0


def test_a_dropped_key_that_dominates_a_row_gets_a_bounded_gradient():
    """v = one-hot rows, so the output is the attention weights a_ij: ∂a_ij/∂m_j ∈ [−1, 1] even where the dropped
    key's score is far above every kept one (the linearisation there would be e^{s_ij − max kept})."""
    q, k, _ = qkv(b=1, h=1, hkv=1, seq=6, d=6, seed=5)
    k[0, 0, 2] = 40 * q[0, 0, 5] / q[0, 0, 5].norm()  # key 2: score ~40/√6 above the rest for query 5
    v = torch.eye(6, dtype=torch.float64)[None, None]  # (1, 1, 6, 6): out[..., i, j] = a_ij
    m = torch.tensor([[1.0, 1.0, 0.0, 1.0, 1.0, 1.0]], requires_grad=True)
    out = soft_masked_attention(q, k, v, m.detach(), m, torch.ones(1, 6, dtype=torch.bool), 6 ** -0.5)
    assert out[0, 0, 5, 2] == 0  # the forward is Eq. 2: key 2 is out
    (grad,) = torch.autograd.grad(out[0, 0, 5, 2], m)
    assert 0 < grad[0, 2] <= 1


def test_straight_through_mask_is_the_hard_mask_with_a_sigmoid_gradient():
    score = torch.tensor([[0.9, 0.05, 0.4, 0.2, 0.01], [0.3, 0.2, 0.1, 0.4, 0.02]], dtype=torch.float64,
                         requires_grad=True)
    hard = torch.tensor([[1, 0, 1, 0, 1], [1, 1, 1, 1, 1]], dtype=torch.bool)  # row 1: p = 1, nothing dropped
    ranked, coef = torch.ones_like(hard), torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0], dtype=torch.float64)
    ranked[:, 4] = False  # the final token: kept whatever its score
    m = straight_through_mask(score, hard, ranked, temperature=0.5)
    assert torch.equal(m, hard.double())
    (m * coef).sum().backward()
    theta = torch.tensor([0.4, 0.2], dtype=torch.float64).log().mean()  # lowest kept, highest dropped
    z = (torch.log(score[0, :4].detach()) - theta) / 0.5
    want = coef[:4] * torch.sigmoid(z) * (1 - torch.sigmoid(z)) / 0.5 / score[0, :4].detach()  # dσ/ds
    assert torch.allclose(score.grad[0, :4], want, rtol=1e-9)
    assert score.grad[0, 4] == 0  # the final token is kept whatever its score: no gradient
    assert torch.equal(score.grad[1], torch.zeros(5, dtype=torch.float64))  # nothing dropped: no gradient


def test_probe_bonus_is_the_weighted_sum_of_the_value_states_by_hand():
    """b_l = Σ_h Σ_d w_hd v_hld, clamped to ±BONUS_LIMIT; the gradient reaches w."""
    _, _, v = qkv(b=2, hkv=2, seq=5, d=3, seed=4)
    w = torch.randn(2, 3, generator=torch.Generator().manual_seed(2), dtype=torch.float64, requires_grad=True)
    b = probe_bonus(v, w)
    want = torch.tensor([[sum(float(w.detach()[h, d]) * float(v[i, h, l, d]) for h in range(2) for d in range(3))
                          for l in range(5)] for i in range(2)], dtype=torch.float64)
    assert b.shape == (2, 5) and torch.allclose(b, want, rtol=1e-9)
    b.sum().backward()
    assert torch.allclose(w.grad, v.sum((0, 2)), rtol=1e-9)  # ∂Σb/∂w_hd = Σ_{i,l} v_ihld
    huge = probe_bonus(v, w.detach() * 1e6)
    assert huge.abs().max() == BONUS_LIMIT and torch.isfinite(huge.exp()).all()
