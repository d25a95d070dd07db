"""sparse_attention.py against independent references: python loops, dense SDPA, brute force over key subsets."""
import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from sparse_attention import (check_keep_p, gathered_sparse_attention, mask_to_indices, probe_column_mass,
                              probe_indices, relaxed_token_ratio, smooth_top_p_count, sparse_attention, token_budget,
                              token_ratio, top_p_count, top_p_select)


def qkv(b=2, h=4, hkv=2, seq=12, d=8, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, n, seq, d, generator=g, dtype=dtype) for n in (h, hkv, hkv)]


def loop_attention(q, k, v, m_q, m_k):
    """Eq. 2 by hand: for every selected query, softmax over selected causal keys of its KV head."""
    out = torch.zeros_like(q)
    groups = q.shape[1] // k.shape[1]
    for b, h, i in itertools.product(range(q.shape[0]), range(q.shape[1]), range(q.shape[2])):
        keys = [j for j in range(i + 1) if m_k[b, j]]
        if not m_q[b, i] or not keys:
            continue
        kh = h // groups
        logits = torch.stack([q[b, h, i] @ k[b, kh, j] for j in keys]) / math.sqrt(q.shape[-1])
        w = torch.softmax(logits, 0)
        out[b, h, i] = sum(w[n] * v[b, kh, j] for n, j in enumerate(keys))
    return out


def random_mask(b, seq, frac, seed):
    return torch.rand(b, seq, generator=torch.Generator().manual_seed(seed)) < frac


@pytest.mark.parametrize("h,hkv", [(4, 4), (4, 2), (6, 1)])
def test_reference_form_matches_python_loops(h, hkv):
    q, k, v = qkv(h=h, hkv=hkv)
    m_q, m_k = random_mask(2, 12, 0.6, 1), random_mask(2, 12, 0.5, 2)
    torch.testing.assert_close(sparse_attention(q, k, v, m_q, m_k), loop_attention(q, k, v, m_q, m_k))


def test_all_selected_is_dense_causal_attention():
    q, k, v = qkv()
    ones = torch.ones(2, 12, dtype=torch.bool)
    dense = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    torch.testing.assert_close(sparse_attention(q, k, v, ones, ones), dense)
    torch.testing.assert_close(gathered_sparse_attention(q, k, v, ones), dense)


def test_unselected_key_is_excluded_and_unselected_query_outputs_zero():
    q, k, v = qkv()
    m = random_mask(2, 12, 0.5, 3)
    m[:, -1] = True
    out = sparse_attention(q, k, v, m, m)
    assert torch.all(out[~m[:, None, :].expand(-1, 4, -1)] == 0)
    k2, v2 = k.clone(), v.clone()
    k2[~m[:, None, :].expand(-1, 2, -1)] = 100.0  # change every unselected key and value
    v2[~m[:, None, :].expand(-1, 2, -1)] = -100.0
    torch.testing.assert_close(sparse_attention(q, k2, v2, m, m), out)


@pytest.mark.parametrize("frac,seed", [(0.5, 0), (0.9, 1), (0.05, 2), (1.0, 3)])
def test_gathered_equals_reference_forward_and_backward(frac, seed):
    q, k, v = qkv(seed=seed, h=4, hkv=2, seq=16)
    mask = random_mask(2, 16, frac, seed)
    mask[:, -1] = True  # at least one selected (k = 1 when frac is tiny)
    mask[1, :5] = False  # a left-padded sample
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    ref = [t.clone().requires_grad_() for t in (q, k, v)]
    out = gathered_sparse_attention(*leaves, mask)
    expect = sparse_attention(*ref, mask, mask)
    torch.testing.assert_close(out, expect)
    w = torch.randn_like(out)
    (out * w).sum().backward()
    (expect * w).sum().backward()
    for a, b in zip(leaves, ref):
        torch.testing.assert_close(a.grad, b.grad)


def test_mask_to_indices_lists_positions_in_order():
    mask = torch.tensor([[0, 1, 0, 1, 1], [1, 0, 0, 0, 0]], dtype=torch.bool)
    idx, ok = mask_to_indices(mask)
    assert idx[0].tolist() == [1, 3, 4] and ok[0].tolist() == [True] * 3
    assert idx[1, :1].tolist() == [0] and ok[1].tolist() == [True, False, False]


def column_mass_by_hand(q, k):
    """s_j = Σ_heads Σ_i A_ij with A the dense causal softmax (every query a probe)."""
    groups = q.shape[1] // k.shape[1]
    kk = k.repeat_interleave(groups, 1)
    a = torch.softmax((q @ kk.transpose(-1, -2) / math.sqrt(q.shape[-1])).masked_fill(
        torch.ones(q.shape[2], q.shape[2], dtype=torch.bool).triu(1), float("-inf")), -1)
    return a.sum((1, 2))


@pytest.mark.parametrize("seq", [4, 7, 10])
def test_count_is_the_minimal_key_subset_reaching_p_brute_force(seq):
    """Eq. 3's column-sum relaxation: the greedy count equals the smallest |S| with Σ_S s_j ≥ p Σ s_j."""
    q, k, _ = qkv(b=1, seq=seq, seed=seq)
    valid = torch.ones(1, seq, dtype=torch.bool)
    idx, ok = probe_indices(valid, num_recent=seq, num_random=0)  # all queries are probes
    mass, seen = probe_column_mass(q, k, valid, idx, ok)
    torch.testing.assert_close(mass, column_mass_by_hand(q, k).to(mass.dtype))
    assert seen[0].tolist() == [seq - j for j in range(seq)]
    s = mass[0].tolist()
    for p in [0.3, 0.5, 0.8, 0.9, 0.975, 0.999]:
        brute = min(len(sub) for r in range(1, seq + 1) for sub in itertools.combinations(range(seq), r)
                    if sum(s[j] for j in sub) >= p * sum(s) - 1e-12)
        assert int(top_p_count(mass, torch.tensor([p]), torch.tensor([seq]))) == brute


def test_identity_is_top_k_of_normalised_mass_and_keeps_the_final_token():
    seq = 10
    q, k, _ = qkv(b=1, seq=seq, seed=5)
    sel = top_p_select(q, k, 0.6, num_recent=seq, num_random=0)
    s = column_mass_by_hand(q, k)[0] / torch.arange(seq, 0, -1, dtype=torch.float64)
    s[-1] = float("inf")
    expect = set(s.argsort(descending=True)[: int(sel.count)].tolist())
    assert set(sel.mask[0].nonzero().flatten().tolist()) == expect
    assert sel.mask[0, -1] and int(sel.mask.sum()) == int(sel.count)


def test_probes_are_recent_plus_random_earlier_and_deterministic():
    valid = torch.ones(2, 300, dtype=torch.bool)
    valid[1, :100] = False  # left padding
    idx, ok = probe_indices(valid, seed=3)
    assert ok.sum(-1).tolist() == [128, 128]
    assert idx[0, 64:].tolist() == list(range(236, 300)) and idx[1, 64:].tolist() == list(range(236, 300))
    assert bool((idx[0, :64] < 236).all()) and bool((idx[1, :64] >= 100).all())
    assert len(set(idx[0, :64].tolist())) == 64
    again, _ = probe_indices(valid, seed=3)
    assert torch.equal(idx, again)
    short, ok_short = probe_indices(torch.ones(1, 20, dtype=torch.bool))
    assert short[0][ok_short[0]].tolist() == list(range(20))


def test_left_padding_is_never_selected_and_selection_is_batch_invariant():
    """A left-padded sample selects the same tokens as when it is alone in the batch, and ℓ excludes padding."""
    torch.manual_seed(0)
    seq, pad = 150, 30
    q, k, _ = qkv(b=2, seq=seq, seed=7)
    valid = torch.ones(2, seq, dtype=torch.bool)
    valid[1, :pad] = False
    sel = top_p_select(q, k, torch.tensor([0.9, 0.8]), valid=valid, seed=11)
    alone = top_p_select(q[1:, :, pad:], k[1:, :, pad:], 0.8, seed=11)
    assert not bool(sel.mask[1, :pad].any())
    assert sel.length.tolist() == [seq, seq - pad]
    assert torch.equal(sel.mask[1, pad:], alone.mask[0]) and int(sel.count[1]) == int(alone.count[0])


def test_p_one_keeps_everything_and_reproduces_dense():
    q, k, v = qkv(seq=40, seed=9)
    sel = top_p_select(q, k, 1.0)
    assert bool(sel.mask.all()) and sel.count.tolist() == [40, 40]
    dense = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    torch.testing.assert_close(sparse_attention(q, k, v, sel.mask, sel.mask), dense)


def test_count_grows_with_p():
    q, k, _ = qkv(b=1, seq=200, seed=4)
    counts = [int(top_p_select(q, k, p).count) for p in (0.2, 0.5, 0.8, 0.95, 0.99, 1.0)]
    assert counts == sorted(counts) and counts[0] < counts[-1] == 200


@pytest.mark.parametrize("bad", [0.0, -0.1, 1.5, float("nan")])
def test_keep_p_outside_unit_interval_raises(bad):
    q, k, _ = qkv()
    with pytest.raises(ValueError, match="keep_p"):
        top_p_select(q, k, bad)
    with pytest.raises(ValueError, match="keep_p"):
        check_keep_p([0.5, bad], 2)


def test_budget_and_ratio_by_hand():
    m_q = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]], dtype=torch.bool)
    assert token_budget(m_q, m_q).tolist() == [4, 8]
    kept = torch.tensor([[2, 4], [1, 3]])  # k_j per layer
    torch.testing.assert_close(token_ratio(kept, torch.tensor([4, 4])), torch.tensor([0.75, 0.5]))


def test_per_row_error_bound_holds():
    """‖o − o_sparse‖ ≤ 2(1 − P)·max‖v‖ for every query row, P = its kept attention mass."""
    q, k, v = qkv(b=1, h=2, hkv=2, seq=64, seed=12)
    sel = top_p_select(q, k, 0.7, num_recent=64, num_random=0)
    ones = torch.ones_like(sel.mask)
    dense = sparse_attention(q, k, v, ones, ones)
    sparse = sparse_attention(q, k, v, ones, sel.mask)  # every query, only kept keys
    a = torch.softmax((q @ k.transpose(-1, -2) / math.sqrt(8)).masked_fill(
        torch.ones(64, 64, dtype=torch.bool).triu(1), float("-inf")), -1)  # (1, 2, 64, 64)
    kept_mass = (a * sel.mask[:, None, None, :]).sum(-1)  # (1, 2, 64)
    err = (dense - sparse).norm(dim=-1)
    bound = 2 * (1 - kept_mass) * v.norm(dim=-1).max()
    assert bool((err <= bound + 1e-9).all()) and bool((err > 0).any())


# ----------------------------------------------------------------------------------------------------------------
# Eq. 3, relaxed (smooth count): the differentiable token ratio of the learned-sparsity loss term
# ----------------------------------------------------------------------------------------------------------------

def random_masses(b=6, seq=40, seed=0):
    """Peaked positive masses with left padding (mass 0) and their lengths."""
    g = torch.Generator().manual_seed(seed)
    mass = torch.randn(b, seq, generator=g, dtype=torch.float64).mul(2).exp()  # (B, L) log-normal
    length = torch.randint(seq // 2, seq + 1, (b,), generator=g)
    valid = torch.arange(seq)[None] >= seq - length[:, None]  # left padding
    return mass * valid, length, torch.rand(b, generator=g, dtype=torch.float64) * 0.9 + 0.05


def test_smooth_count_tends_to_the_hard_count_as_t_goes_to_zero():
    for seed in range(5):
        mass, length, p = random_masses(seed=seed)
        hard = top_p_count(mass, p, length).double()  # (B,)
        gaps = [(smooth_top_p_count(mass, p, length, t) - hard).abs().max().item() for t in (1e-1, 1e-2, 1e-3, 1e-7)]
        assert gaps[-1] < 1e-6, gaps  # the limit: the hard count, padding excluded
        assert gaps[0] > gaps[-1] and gaps[0] > 0.05  # and it is a relaxation, not a copy
    ones = torch.ones_like(p)
    assert torch.equal(smooth_top_p_count(mass, ones, length, 0.01), length.double())  # p = 1: every real token


def test_smooth_count_gradient_matches_finite_differences_and_favours_the_top_keys():
    g = torch.Generator().manual_seed(7)
    x = torch.randn(3, 12, generator=g, dtype=torch.float64).mul(2).exp().requires_grad_()  # distinct: no ties
    p, length = torch.tensor([0.5, 0.8, 0.95], dtype=torch.float64), torch.full((3,), 12)
    assert torch.autograd.gradcheck(lambda m: smooth_top_p_count(m, p, length, 0.05), (x,))
    count = smooth_top_p_count(x, p, length, 0.05)
    (grad,) = torch.autograd.grad(count.sum(), x)
    rows = torch.arange(3)
    assert bool((grad[rows, x.argmax(-1)] < 0).all())  # more mass on the top key: fewer tokens needed
    assert bool((grad[rows, x.argmin(-1)] > 0).all())  # more mass in the tail: more tokens


def test_relaxed_ratio_gradient_concentrates_attention_on_the_top_keys():
    """Through the probe scores (q, k, float64): finite differences agree, and a step against the gradient of τ̃
    raises the share of mass the hard top-k keys hold and lowers τ̃."""
    q, k, _ = qkv(b=2, seq=10, seed=3)
    valid, p = torch.ones(2, 10, dtype=torch.bool), torch.tensor([0.6, 0.8], dtype=torch.float64)
    ratio = lambda q, k, recompute=True: relaxed_token_ratio(q, k, p, 0.05, valid, num_recent=4, num_random=3,
                                                             recompute=recompute)  # noqa: E731
    q.requires_grad_(), k.requires_grad_()
    assert torch.autograd.gradcheck(ratio, (q, k))
    idx, ok = probe_indices(valid, 4, 3)

    def top_share(q, k):
        mass, _ = probe_column_mass(q, k, valid, idx, ok)
        top = mass.sort(-1, descending=True).values[:, :3].sum(-1)  # the 3 heaviest keys of the start
        return top / mass.sum(-1)
    before, share = ratio(q, k), top_share(q, k)
    dq, dk = torch.autograd.grad(before.sum(), (q, k))
    after = ratio(q - 0.5 * dq, k - 0.5 * dk)
    assert bool((after < before).all()) and bool((top_share(q - 0.5 * dq, k - 0.5 * dk) > share).all())
    plain = torch.autograd.grad(ratio(q, k, recompute=False).sum(), (q, k))
    assert all(torch.allclose(a, b, rtol=1e-12, atol=1e-15) for a, b in zip(plain, (dq, dk)))  # recompute: same grad


def test_relaxed_ratio_at_p_one_is_one_with_zero_gradient():
    q, k, _ = qkv(b=2, seq=10, seed=4)
    q.requires_grad_()
    tau = relaxed_token_ratio(q, k, torch.ones(2, dtype=torch.float64), 0.01, num_recent=4, num_random=3)
    (grad,) = torch.autograd.grad(tau.sum(), q)
    assert tau.tolist() == [1.0, 1.0] and bool((grad == 0).all())


def test_relaxed_ratio_keeps_no_probe_probabilities_for_backward():
    """recompute=True saves the probe queries (B, H, P, D), not the (B, Hkv, G, P, L) probabilities: new storage
    saved for backward, measured with saved-tensor hooks (q and k themselves are alive anyway: the attention saves
    them); recompute=False does keep the probabilities (so the check can tell)."""
    b, h, hkv, seq, d = 2, 4, 2, 64, 8
    q, k, _ = qkv(b=b, h=h, hkv=hkv, seq=seq, d=d, seed=1, dtype=torch.float32)
    q.requires_grad_(), k.requires_grad_()
    p = torch.tensor([0.7, 0.9])

    inputs = {q.untyped_storage().data_ptr(), k.untyped_storage().data_ptr()}

    def saved_elements(recompute):
        sizes = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: sizes.append(
                0 if t.untyped_storage().data_ptr() in inputs else t.numel()) or t, lambda t: t):
            relaxed_token_ratio(q, k, p, 0.01, num_recent=8, num_random=8, recompute=recompute)
        return max(sizes)
    probes = 16
    assert saved_elements(True) == b * h * probes * d  # the probe queries: the input of the recomputed part
    assert saved_elements(False) >= b * h * probes * seq  # the probabilities


def test_a_bonus_reorders_the_identity_by_its_factor_and_never_changes_the_count():
    """select_from_mass(bonus=b): the k keys with the largest (mass per seeing probe) · e^b, k as without it."""
    seq = 10
    q, k, _ = qkv(b=1, seq=seq, seed=5)
    bonus = 3 * torch.randn(1, seq, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    plain = top_p_select(q, k, 0.6, num_recent=seq, num_random=0)
    zero = top_p_select(q, k, 0.6, num_recent=seq, num_random=0, bonus=torch.zeros(1, seq))
    sel = top_p_select(q, k, 0.6, num_recent=seq, num_random=0, bonus=bonus)
    assert torch.equal(zero.mask, plain.mask) and int(sel.count) == int(plain.count)
    s = column_mass_by_hand(q, k)[0] / torch.arange(seq, 0, -1, dtype=torch.float64) * bonus[0].exp()
    s[-1] = float("inf")
    expect = set(s.argsort(descending=True)[: int(sel.count)].tolist())
    assert set(sel.mask[0].nonzero().flatten().tolist()) == expect
    assert not torch.equal(sel.mask, plain.mask)  # this bonus does move the selection
