"""grpo.py against hand-computed examples, gradient identities and a naive loop implementation."""
import math
import statistics

import pytest
import torch

from grpo import LOSS_TYPES, completion_mask, group_advantages, grpo_loss, loss_normalizer, token_logprobs



@pytest.fixture(autouse=True)
def float64_by_default():
    """float64 makes the naive-loop comparisons tight; restored afterwards so other test files are unaffected."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


# ---------------------------------------------------------------- Eq. 4 advantages
def test_advantages_hand_example():
    # group 1: r = (1, 2, 3): mean 2, unbiased std sqrt((1 + 0 + 1) / 2) = 1 -> A = (-1, 0, 1) / (1 + eps)
    # group 2: r = (0, 0, 3): mean 1, unbiased std sqrt((1 + 1 + 4) / 2) = sqrt(3) -> A = (-1, -1, 2) / (sqrt(3) + eps)
    eps = 1e-4
    adv = group_advantages(torch.tensor([1.0, 2.0, 3.0, 0.0, 0.0, 3.0]), num_generations=3, eps=eps)
    s3 = math.sqrt(3.0)
    expected = torch.tensor([-1 / (1 + eps), 0.0, 1 / (1 + eps), -1 / (s3 + eps), -1 / (s3 + eps), 2 / (s3 + eps)])
    torch.testing.assert_close(adv, expected.float())


def test_advantages_scale_rewards_batch_and_none_hand_example():
    """TRL's scale_rewards: "batch" centres per group and divides by the std of all six rewards; "none" only centres."""
    r = torch.tensor([1.0, 2.0, 3.0, 0.0, 0.0, 3.0])  # group means 2 and 1
    centred = torch.tensor([-1.0, 0.0, 1.0, -1.0, -1.0, 2.0])
    batch_std = statistics.stdev(r.tolist())  # unbiased over the batch: mean 1.5, Σ(r - 1.5)^2 = 9.5, sqrt(9.5 / 5)
    assert batch_std == pytest.approx(math.sqrt(1.9))
    torch.testing.assert_close(group_advantages(r, 3, scale="batch"), (centred / (batch_std + 1e-4)).float())
    torch.testing.assert_close(group_advantages(r, 3, scale="none"), centred.float())
    constant = group_advantages(torch.tensor([0.1, 0.1, 0.1, 1.0, 0.0, 1.0]), 3, scale="none")
    assert torch.equal(constant[:3], torch.zeros(3, dtype=constant.dtype))  # a constant group stays exactly 0
    with pytest.raises(ValueError, match="scale must be one of"):
        group_advantages(r, 3, scale="std")


def test_advantages_2d_input_keeps_shape_and_matches_flat():
    r = torch.rand(4, 8)
    adv2d = group_advantages(r, num_generations=8)
    assert adv2d.shape == (4, 8)
    torch.testing.assert_close(adv2d, group_advantages(r.reshape(-1), 8).reshape(4, 8))


def test_advantages_match_statistics_module():
    torch.manual_seed(0)
    rewards = torch.rand(5 * 6)
    adv = group_advantages(rewards, num_generations=6, eps=1e-4)
    for g in range(5):
        group = rewards[g * 6:(g + 1) * 6].tolist()
        mu, sd = statistics.mean(group), statistics.stdev(group)  # stdev is the unbiased (N-1) estimator
        for n, r in enumerate(group):
            assert adv[g * 6 + n].item() == pytest.approx((r - mu) / (sd + 1e-4), rel=1e-5, abs=1e-6)


def test_zero_std_group_gives_exact_zero_and_no_nan():
    # 0.1 is not exact in binary, so a naive mean could leave a tiny nonzero residual; we want exact zeros
    rewards = torch.tensor([0.1] * 7 + [1.0, 0.0, 0.0, 0.0, 1.0, 1.0, 0.5], dtype=torch.float32)
    adv = group_advantages(rewards, num_generations=7)
    assert torch.equal(adv[:7], torch.zeros(7, dtype=adv.dtype))
    assert adv[7:].abs().sum() > 0 and not torch.isnan(adv).any()
    single = group_advantages(torch.tensor([5.0, 7.0]), num_generations=1)  # N=1: every group is constant
    assert torch.equal(single, torch.zeros(2, dtype=single.dtype))


def test_advantages_bad_input():
    with pytest.raises(ValueError, match="num_generations"):
        group_advantages(torch.rand(7), num_generations=3)
    with pytest.raises(ValueError, match="columns"):
        group_advantages(torch.rand(2, 4), num_generations=3)
    with pytest.raises(ValueError, match="num_generations"):
        group_advantages(torch.rand(4), num_generations=0)


# ---------------------------------------------------------------- log-probs and masks
@pytest.mark.parametrize("temperature", [1.0, 0.7, 1.3])
def test_token_logprobs_match_categorical(temperature):
    torch.manual_seed(1)
    logits = torch.randn(3, 5, 11, requires_grad=True)
    tokens = torch.randint(0, 11, (3, 5))
    ours = token_logprobs(logits, tokens, temperature)
    ref = torch.distributions.Categorical(logits=logits / temperature).log_prob(tokens)
    torch.testing.assert_close(ours, ref.float())
    (g_ours,) = torch.autograd.grad(ours.sum(), logits)
    (g_ref,) = torch.autograd.grad(ref.sum(), logits)
    torch.testing.assert_close(g_ours, g_ref, rtol=1e-5, atol=1e-6)


def test_token_logprobs_bad_input():
    with pytest.raises(ValueError, match="temperature"):
        token_logprobs(torch.randn(1, 2, 3), torch.zeros(1, 2, dtype=torch.long), temperature=0.0)
    with pytest.raises(ValueError, match="tokens"):
        token_logprobs(torch.randn(1, 2, 3), torch.zeros(1, 3, dtype=torch.long))


def test_completion_mask_hand_examples():
    ids = torch.tensor([[5, 6, 2, 0, 0],   # EOS at 2, then padding
                        [5, 2, 7, 2, 9],   # tokens after the first EOS are dropped, even a second EOS
                        [5, 6, 7, 8, 9],   # truncated: no EOS, all kept
                        [2, 0, 0, 0, 0]])  # immediate EOS
    expected = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]])
    assert torch.equal(completion_mask(ids, eos_token_id=2, pad_token_id=0), expected)
    # pad id == eos id: the first EOS is still part of the completion
    assert torch.equal(completion_mask(torch.tensor([[5, 2, 2, 2]]), 2, pad_token_id=2), torch.tensor([[1, 1, 0, 0]]))
    # a pad before the EOS is masked; several EOS ids
    assert torch.equal(completion_mask(torch.tensor([[5, 0, 6, 2]]), 2, 0), torch.tensor([[1, 0, 1, 1]]))
    assert torch.equal(completion_mask(torch.tensor([[5, 3, 6, 2]]), [2, 3]), torch.tensor([[1, 1, 0, 0]]))


# ---------------------------------------------------------------- Eq. 5 loss: hand examples
def _hand_batch():
    # seq 0: A=+1, ratios (1.5, 0.9), mask (1, 1); seq 1: A=-1, ratios (0.5, 3.0), mask (1, 0); eps = 0.2
    old = torch.zeros(2, 2)
    logp = torch.log(torch.tensor([[1.5, 0.9], [0.5, 3.0]])).requires_grad_()
    return logp, old, torch.tensor([1.0, -1.0]), torch.tensor([[1, 1], [1, 0]])


def test_loss_hand_example_all_loss_types():
    # per-token objective min(rA, clip(r, 0.8, 1.2)A):
    #   seq 0: min(1.5, 1.2) = 1.2 ; min(0.9, 0.9) = 0.9      seq 1: min(-0.5, -0.8) = -0.8 ; (masked)
    # per-token loss = -objective: (-1.2, -0.9), (0.8, -)
    #   grpo: mean(-2.1 / 2, 0.8 / 1) = (-1.05 + 0.8) / 2 = -0.125
    #   bnpo/dapo: (-1.2 - 0.9 + 0.8) / 3 = -1.3 / 3      dr_grpo: -1.3 / (2 seqs * 2 tokens) = -0.325
    expected = {"grpo": -0.125, "bnpo": -1.3 / 3, "dapo": -1.3 / 3, "dr_grpo": -0.325}
    for loss_type, value in expected.items():
        logp, old, adv, mask = _hand_batch()
        loss, stats = grpo_loss(logp, old, None, adv, mask, epsilon=0.2, beta=0.04, loss_type=loss_type)
        assert loss.item() == pytest.approx(value, abs=1e-12), loss_type
    logp, old, adv, mask = _hand_batch()
    loss, _ = grpo_loss(logp, old, None, adv, mask, loss_type="dr_grpo", max_completion_length=5)
    assert loss.item() == pytest.approx(-1.3 / 10, abs=1e-12)  # constant normaliser 2 * 5
    # clip stats: seq0 t0 is high-clipped (1.5 > 1.2, A > 0), seq1 t0 low-clipped (0.5 < 0.8, A < 0): 2 of 3 tokens
    assert stats["clip_fraction"] == pytest.approx(2 / 3)
    assert stats["clip_low_fraction"] == pytest.approx(1 / 3) and stats["clip_high_fraction"] == pytest.approx(1 / 3)
    assert stats["ratio_mean"] == pytest.approx((1.5 + 0.9 + 0.5) / 3)
    assert math.isnan(stats["kl"])


def test_loss_normalizer_hand_example_and_micro_batch_split():
    logp, old, adv, mask = _hand_batch()  # mask (1, 1), (1, 0): 2 sequences, 3 tokens, T = 2
    assert [loss_normalizer(mask, t) for t in LOSS_TYPES] == [2, 3, 3, 4]  # grpo, bnpo, dapo, dr_grpo
    assert loss_normalizer(mask, "dr_grpo", max_completion_length=5) == 10
    with pytest.raises(ValueError, match="loss_type"):
        loss_normalizer(mask, "ppo")
    for loss_type in LOSS_TYPES:  # whole-batch loss = Σ_b n_b L_b / Σ_b n_b over one-sequence micro-batches
        kw = dict(epsilon=0.2, loss_type=loss_type, max_completion_length=2)
        whole = grpo_loss(logp, old, None, adv, mask, **kw)[0]
        parts = [(grpo_loss(logp[b:b + 1], old[b:b + 1], None, adv[b:b + 1], mask[b:b + 1], **kw)[0],
                  loss_normalizer(mask[b:b + 1], loss_type, 2)) for b in range(2)]
        assert whole.item() == pytest.approx(sum(n * part.item() for part, n in parts) / sum(n for _, n in parts))


def test_kl_hand_example():
    # one token, A = 0 so only the KL term is left: pi = 0.5, pi_ref = 0.25 -> d = ref - logp = log(0.5)
    # k3 = exp(d) - d - 1 = 0.5 + ln 2 - 1 = 0.19315, loss = beta * k3 with beta = 0.1
    logp = torch.tensor([[math.log(0.5)]], requires_grad=True)
    ref = torch.tensor([[math.log(0.25)]])
    loss, stats = grpo_loss(logp, None, ref, torch.zeros(1), torch.ones(1, 1), beta=0.1)
    k3 = 0.5 + math.log(2) - 1
    assert loss.item() == pytest.approx(0.1 * k3) and stats["kl"] == pytest.approx(k3)
    loss0, stats0 = grpo_loss(logp, None, ref, torch.zeros(1), torch.ones(1, 1), beta=0.0)
    assert loss0.item() == 0.0 and stats0["kl"] == pytest.approx(k3)  # beta=0: no KL in the loss, still logged


def test_kl_zero_when_policy_is_reference_and_no_overflow():
    torch.manual_seed(2)
    logp = torch.randn(3, 4).requires_grad_()
    mask = torch.ones(3, 4)
    loss, stats = grpo_loss(logp, None, logp.detach().clone(), torch.zeros(3), mask, beta=0.5)
    (grad,) = torch.autograd.grad(loss, logp)
    assert loss.item() == 0.0 and stats["kl"] == 0.0 and torch.equal(grad, torch.zeros_like(grad))
    # far-apart log-probs: the log-ratio is clamped to +-20, so k3 = exp(20) - 20 - 1 stays finite
    far = torch.tensor([[-1000.0]], dtype=torch.float32, requires_grad=True)
    ref = torch.zeros(1, 1, dtype=torch.float32)
    loss, stats = grpo_loss(far, None, ref, torch.zeros(1), torch.ones(1, 1), beta=1.0)
    assert torch.isfinite(loss) and stats["kl"] == pytest.approx(math.exp(20) - 21, rel=1e-6)


# ---------------------------------------------------------------- Eq. 5 loss: gradients
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_gradient_at_ratio_one_is_minus_advantage_times_mask(loss_type):
    torch.manual_seed(3)
    B, T = 4, 6
    logp = (-torch.rand(B, T) * 3).requires_grad_()
    lengths = torch.tensor([6, 3, 1, 4])
    mask = (torch.arange(T) < lengths[:, None]).double()
    adv = torch.randn(B)
    loss, _ = grpo_loss(logp, None, None, adv, mask, beta=0.0, loss_type=loss_type)
    (grad,) = torch.autograd.grad(loss, logp)
    normaliser = {"grpo": B * lengths[:, None].double(), "bnpo": mask.sum(), "dapo": mask.sum(),
                  "dr_grpo": torch.tensor(B * T).double()}[loss_type]
    torch.testing.assert_close(grad, -adv[:, None] * mask / normaliser)


def test_policy_gradient_through_logits():
    # at ratio 1 the GRPO loss has the same gradient as -sum_i A_i / (B |o_i|) sum_t log pi(o_it)
    torch.manual_seed(4)
    logits = torch.randn(3, 5, 7, requires_grad=True)
    tokens = torch.randint(0, 7, (3, 5))
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [1, 1, 1, 0, 0]])
    adv = torch.tensor([0.5, -1.0, 2.0])
    loss, _ = grpo_loss(token_logprobs(logits, tokens, 0.8), None, None, adv, mask, beta=0.0)
    (g_loss,) = torch.autograd.grad(loss, logits)
    logp = torch.distributions.Categorical(logits=logits / 0.8).log_prob(tokens)
    surrogate = -(adv[:, None] * logp * mask / mask.sum(1, keepdim=True)).sum() / 3
    (g_pg,) = torch.autograd.grad(surrogate, logits)
    torch.testing.assert_close(g_loss, g_pg, rtol=1e-5, atol=1e-6)


def _grad_one_token(ratio, adv, epsilon=0.2, epsilon_high=None):
    logp = torch.tensor([[math.log(ratio)]], requires_grad=True)
    loss, _ = grpo_loss(logp, torch.zeros(1, 1), None, torch.tensor([adv]), torch.ones(1, 1),
                        epsilon=epsilon, epsilon_high=epsilon_high, beta=0.0)
    return torch.autograd.grad(loss, logp)[0].item()


def test_clipping_boundaries():
    # d(-rA)/dlogp = -rA where the unclipped branch is active, 0 where the clipped constant wins
    assert _grad_one_token(1.5, +1.0) == 0.0                          # above 1+eps, A > 0: clipped
    assert _grad_one_token(1.5, -1.0) == pytest.approx(1.5)           # above 1+eps, A < 0: still pushed down
    assert _grad_one_token(0.5, -1.0) == 0.0                          # below 1-eps, A < 0: clipped
    assert _grad_one_token(0.5, +1.0) == pytest.approx(-0.5)          # below 1-eps, A > 0: still pushed up
    # asymmetric (DAPO clip-higher): eps = 0.2, eps_high = 0.28
    assert _grad_one_token(1.25, +1.0) == 0.0                         # symmetric clip at 1.2 ...
    assert _grad_one_token(1.25, +1.0, epsilon_high=0.28) == pytest.approx(-1.25)  # ... but 1.25 < 1.28
    assert _grad_one_token(1.3, +1.0, epsilon_high=0.28) == 0.0
    assert _grad_one_token(0.75, -1.0, epsilon_high=0.28) == 0.0      # low side still at 1 - 0.2


# ---------------------------------------------------------------- Eq. 5 loss: naive reference
def naive_grpo_loss(logp, old, ref, adv, mask, eps, eps_high, beta, loss_type, max_len):
    """Plain python loops over sequences and tokens; scalars stay torch so autograd works."""
    B, T = len(mask), len(mask[0])
    seq_sums, seq_counts = [], []
    for i in range(B):
        total, count = 0.0, 0
        for t in range(T):
            if mask[i][t] == 0:
                continue
            a = adv[i][t] if adv.dim() == 2 else adv[i]
            r = torch.exp(logp[i, t] - old[i][t])
            c = min(max(r.item(), 1 - eps), 1 + eps_high)
            obj = r * a if (r * a).item() <= c * a.item() else torch.tensor(c) * a
            if beta > 0:
                d = max(min(ref[i][t].item() - logp[i, t].item(), 20.0), -20.0)
                d = ref[i][t] - logp[i, t] if abs(d) < 20 else torch.tensor(d)
                obj = obj - beta * (torch.exp(d) - d - 1)
            total, count = total - obj, count + 1
        seq_sums.append(total)
        seq_counts.append(count)
    if loss_type == "grpo":
        return sum(s / max(n, 1) for s, n in zip(seq_sums, seq_counts)) / B
    if loss_type in ("bnpo", "dapo"):
        return sum(seq_sums) / max(sum(seq_counts), 1)
    return sum(seq_sums) / (B * max_len)


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize("eps_high,beta,per_token_adv", [(None, 0.04, False), (0.28, 0.0, False), (0.3, 0.1, True)])
def test_matches_naive_loops(loss_type, eps_high, beta, per_token_adv):
    torch.manual_seed(5)
    B, T = 6, 7
    logp = (-torch.rand(B, T) * 4).requires_grad_()
    old = logp.detach() + 0.4 * torch.randn(B, T)  # ratios spread over both clip boundaries
    ref = logp.detach() + torch.randn(B, T)
    ref[0, 0] = logp[0, 0].item() + 30.0  # exercises the +-20 clamp
    lengths = torch.tensor([7, 3, 0, 5, 1, 6])  # trailing zeros, one empty completion
    mask = (torch.arange(T) < lengths[:, None]).long()
    adv = group_advantages(torch.rand(B), num_generations=3).double()
    if per_token_adv:
        adv = adv[:, None] + 0.1 * torch.randn(B, T)
    loss, stats = grpo_loss(logp, old, ref, adv, mask, epsilon=0.2, epsilon_high=eps_high, beta=beta,
                            loss_type=loss_type, max_completion_length=9)
    naive = naive_grpo_loss(logp, old, ref, adv, mask.tolist(), 0.2, eps_high or 0.2, beta, loss_type, 9)
    torch.testing.assert_close(loss, naive)
    (g,) = torch.autograd.grad(loss, logp)
    (g_naive,) = torch.autograd.grad(naive, logp)
    torch.testing.assert_close(g, g_naive)
    ratios = [math.exp(logp[i, t].item() - old[i, t].item()) for i in range(B) for t in range(lengths[i])]
    assert stats["ratio_mean"] == pytest.approx(sum(ratios) / len(ratios))
    assert 0 < stats["clip_fraction"] < 1


def test_loss_bad_input():
    logp, adv, mask = torch.zeros(2, 3), torch.zeros(2), torch.ones(2, 3)
    with pytest.raises(ValueError, match="loss_type"):
        grpo_loss(logp, None, None, adv, mask, loss_type="ppo")
    with pytest.raises(ValueError, match="mask"):
        grpo_loss(logp, None, None, adv, torch.ones(2, 4))
    with pytest.raises(ValueError, match="advantages"):
        grpo_loss(logp, None, None, torch.zeros(3), mask)
    with pytest.raises(ValueError, match="epsilon"):
        grpo_loss(logp, None, None, adv, mask, epsilon=-0.1)
