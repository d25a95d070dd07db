"""zipr1_kernels/ against the torch reference of sparse_attention.py: through the Triton interpreter on CPU (conftest sets
TRITON_INTERPRET=1 there), natively when a GPU is present.

References are the literal masked form `sparse_attention` (Eq. 2) and `probe_column_mass` / `top_p_select` (Eq. 3),
evaluated in float64; fp32 kernels must match them to fp32 rounding, fp16 / bf16 kernels must be no less accurate
than the torch reference run in the same dtype.
"""
import ast
import importlib
import os
import subprocess
import sys

import pytest
import torch

import zipr1_kernels
from sparse_attention import gathered_sparse_attention, probe_column_mass, probe_indices, sparse_attention, top_p_select

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # where the kernels run; references stay on the CPU


def assert_close_to_scale(got, want, atol, rtol, **kw):
    """assert_close with `atol` per unit of magnitude (times max(1, max|want|)): fp32 sums carry rounding that grows
    with their size and differs between CPUs, so a bare atol on large sums fails on some machines."""
    scale = max(1.0, float(want.detach().abs().max())) if want.numel() else 1.0
    torch.testing.assert_close(got, want, atol=atol * scale, rtol=rtol, **kw)


def qkv(b, h, hkv, seq, d, seed, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, n, seq, d, generator=g, dtype=dtype) for n in (h, hkv, hkv)]


def selection(kind: str, b: int, seq: int, seed: int) -> torch.Tensor:
    """(B, L) bool masks covering the cases the kernel must get right."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(b, seq, generator=g) < 0.5
    if kind == "left_padded":  # sample 1 starts with padding, which is never selected
        mask[1, : seq // 3] = False
    elif kind == "k=1":  # a single selected token per sample (the final one, or an early one)
        mask = torch.zeros(b, seq, dtype=torch.bool)
        mask[0, -1], mask[1, 3] = True, True
    elif kind == "all":
        mask = torch.ones(b, seq, dtype=torch.bool)
    elif kind == "empty_sample":  # sample 1 selects nothing: its whole output is 0
        mask[1] = False
    return mask


def outputs_and_grads(fn, tensors, dtype, weight, device="cpu"):
    """fn(q, k, v) in `dtype` on `device` and the gradients of Σ fn · weight, all returned in float64 on the CPU."""
    leaves = [t.to(device, dtype).detach().requires_grad_() for t in tensors]
    out = fn(*leaves)
    (out.double() * weight.to(device)).sum().backward()
    return [out.detach().double().cpu()] + [t.grad.double().cpu() for t in leaves]


def triton_prefill(mask):
    return lambda q, k, v: zipr1_kernels.prefill_sparse_attention(q, k, v, mask.to(q.device), backend="triton")


PREFILL_CASES = [  # (H, Hkv, L, D, selection)
    (4, 4, 40, 16, "random"),
    (4, 2, 40, 16, "left_padded"),
    (6, 1, 33, 16, "k=1"),
    (4, 2, 37, 16, "all"),
    (2, 1, 24, 16, "empty_sample"),
    (4, 2, 48, 64, "random"),
]


@pytest.mark.parametrize("h,hkv,seq,d,kind", PREFILL_CASES)
def test_prefill_forward_and_backward_match_reference_fp32(h, hkv, seq, d, kind):
    q, k, v = qkv(2, h, hkv, seq, d, seed=seq + d)
    mask = selection(kind, 2, seq, seed=seq)
    weight = torch.randn(2, h, seq, d, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    got = outputs_and_grads(triton_prefill(mask), (q, k, v), torch.float32, weight, DEVICE)
    expect = outputs_and_grads(lambda *t: sparse_attention(*t, mask, mask), (q, k, v), torch.float64, weight)
    for name, a, b in zip(["out", "dq", "dk", "dv"], got, expect):
        assert_close_to_scale(a, b, atol=2e-5, rtol=2e-5, msg=lambda m: f"{name}: {m}")
    assert torch.all(got[0][~mask[:, None, :].expand(-1, h, -1)] == 0)  # unselected rows are exactly 0


def test_prefill_reads_hf_layout_views_and_a_custom_scale():
    """HF hands q, k, v as (B, L, H, D).transpose(1, 2): strided views, not contiguous tensors; and wants the output
    back as (B, L, H, D). Gradients must land in the views' layout too (dq written with q's strides)."""
    mask = selection("left_padded", 2, 36, seed=4)
    weight = torch.randn(2, 4, 36, 16, generator=torch.Generator().manual_seed(2), dtype=torch.float64)

    def hf_views(fn):
        return lambda *t: fn(*(x.transpose(1, 2).contiguous().transpose(1, 2) for x in t))

    def check_layout(q, k, v):
        assert not q.is_contiguous()
        out = zipr1_kernels.prefill_sparse_attention(q, k, v, mask.to(q.device), scale=0.3, backend="triton")
        assert out.transpose(1, 2).is_contiguous()  # written in HF's output layout: no copy in sparse_qwen
        return out.transpose(1, 2).contiguous().transpose(1, 2)  # and the gradient comes back strided

    got = outputs_and_grads(hf_views(check_layout), qkv(2, 4, 2, 36, 16, seed=3), torch.float32, weight, DEVICE)
    expect = outputs_and_grads(lambda q, k, v: sparse_attention(q, k, v, mask, mask, scale=0.3),
                               qkv(2, 4, 2, 36, 16, seed=3), torch.float64, weight)
    for name, a, b in zip(["out", "dq", "dk", "dv"], got, expect):
        assert_close_to_scale(a, b, atol=2e-5, rtol=2e-5, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_prefill_low_precision_is_as_accurate_as_torch_in_the_same_dtype(dtype):
    q, k, v = qkv(2, 4, 2, 40, 16, seed=7)
    mask = selection("left_padded", 2, 40, seed=8)
    weight = torch.randn(2, 4, 40, 16, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    truth = outputs_and_grads(lambda *t: sparse_attention(*t, mask, mask), (q, k, v), torch.float64, weight)
    torch_lp = outputs_and_grads(lambda *t: sparse_attention(*t, mask, mask), (q, k, v), dtype, weight)
    triton_lp = outputs_and_grads(triton_prefill(mask), (q, k, v), dtype, weight, DEVICE)
    for name, tri, tor, ref in zip(["out", "dq", "dk", "dv"], triton_lp, torch_lp, truth):
        err_triton, err_torch = (tri - ref).abs().max(), (tor - ref).abs().max()
        assert err_triton <= 3 * err_torch, f"{name}: Triton error {err_triton:.2e} vs torch {err_torch:.2e}"


def decode_reference(q, k, v, key_valid):
    """The newest query sees every valid key: Eq. 2 with m_Q = [1] against m_K = key_valid."""
    return sparse_attention(q, k, v, torch.ones(q.shape[0], 1, dtype=torch.bool), key_valid)


def decode_cache(seed: int, b=3, h=4, hkv=2, keys=50, d=16):
    """A padded pruned cache: sample 0 dense, sample 1 left-padded and sparse, sample 2 with no valid key."""
    q, _, _ = qkv(b, h, hkv, 1, d, seed)
    _, k, v = qkv(b, h, hkv, keys, d, seed + 1)
    valid = torch.rand(b, keys, generator=torch.Generator().manual_seed(seed)) < 0.6
    valid[0], valid[1, :20], valid[2] = True, False, False
    return q, k, v, valid


@pytest.mark.parametrize("splits", [1, 3, None])
@pytest.mark.parametrize("h,hkv", [(4, 2), (3, 3)])
def test_decode_matches_reference_fp32(splits, h, hkv):
    q, k, v, valid = decode_cache(seed=h + hkv, h=h, hkv=hkv)
    got = zipr1_kernels.decode_attention(*(t.to(DEVICE, torch.float32) for t in (q, k, v)), valid.to(DEVICE),
                                   splits=splits, backend="triton").cpu()
    assert_close_to_scale(got.double(), decode_reference(q, k, v, valid), atol=2e-5, rtol=2e-5)
    assert torch.all(got[2] == 0)  # no valid key -> 0


def test_decode_bf16_and_torch_backend_match_reference():
    q, k, v, valid = decode_cache(seed=5, d=64)
    truth = decode_reference(q, k, v, valid)
    got = zipr1_kernels.decode_attention(*(t.to(DEVICE, torch.bfloat16) for t in (q, k, v)), valid.to(DEVICE), splits=2,
                                   backend="triton").cpu()
    err_torch = (decode_reference(*(t.bfloat16() for t in (q, k, v)), valid).double() - truth).abs().max()
    assert (got.double() - truth).abs().max() <= 3 * err_torch
    torch.testing.assert_close(zipr1_kernels.decode_attention(q, k, v, valid, backend="torch"), truth)


@pytest.mark.parametrize("splits,dtype", [(1, torch.float32), (3, torch.float32), (None, torch.bfloat16)])
def test_probe_column_mass_matches_reference(splits, dtype):
    q, k, _ = qkv(2, 4, 2, 60, 16, seed=11)
    q, k = q.to(dtype), k.to(dtype)
    valid = torch.ones(2, 60, dtype=torch.bool)
    valid[1, :13] = False  # left padding
    probe_idx, probe_ok = probe_indices(valid, num_recent=8, num_random=8, seed=1)
    probe_ok[0, :3] = False  # some probe slots are padding
    args = [t.to(DEVICE) for t in (q, k, valid, probe_idx, probe_ok)]
    if splits:  # force the split-and-combine path of pass 1
        mass, seen = importlib.import_module("zipr1_kernels.probe").probe_column_mass_triton(*args, splits=splits)
    else:
        mass, seen = zipr1_kernels.probe_column_mass(*args, backend="triton")
    mass, seen = mass.cpu(), seen.cpu()
    expect_mass, expect_seen = probe_column_mass(q.double(), k.double(), valid, probe_idx, probe_ok)
    assert_close_to_scale(mass.double(), expect_mass, atol=1e-5, rtol=1e-5)
    assert torch.equal(seen, expect_seen.float())


@pytest.mark.parametrize("seq,seed", [(20, 0), (300, 3), (2000, 1)])
def test_probe_positions_equal_probe_indices(seq, seed):
    """The loop-free probe positions of the fused selection are exactly sparse_attention.probe_indices'."""
    g = torch.Generator().manual_seed(seed)
    valid = torch.rand(3, seq, generator=g) < 0.8  # holes anywhere
    valid[1, : seq // 3] = False  # left padding
    valid[2, :-5] = False  # a sample shorter than the recent window
    expect_idx, expect_ok = probe_indices(valid, seed=seed)
    idx, ok = importlib.import_module("zipr1_kernels.probe").probe_positions(valid, valid.sum(-1).tolist(), 64, 64, seed)
    assert torch.equal(idx, expect_idx) and torch.equal(ok, expect_ok)


@pytest.mark.parametrize("keep_p, scored", [(0.5, False), (0.9, False), (1.0, False), (0.5, True)])
def test_top_p_select_picks_the_reference_token_set(keep_p, scored):
    """Also with a learned probe scorer's bonus (learned_sparsity.probe_bonus), which both backends apply alike."""
    q, k, _ = qkv(2, 4, 2, 48, 16, seed=13, dtype=torch.float32)
    valid = torch.ones(2, 48, dtype=torch.bool)
    valid[0, :10] = False
    bonus = 2 * torch.randn(2, 48, generator=torch.Generator().manual_seed(3)) if scored else None
    got = zipr1_kernels.top_p_select(q.to(DEVICE), k.to(DEVICE), keep_p, valid.to(DEVICE), num_recent=8, num_random=8,
                               seed=2, backend="triton", bonus=None if bonus is None else bonus.to(DEVICE))
    expect = top_p_select(q, k, keep_p, valid, num_recent=8, num_random=8, seed=2, bonus=bonus)
    assert torch.equal(got.count.cpu(), expect.count) and torch.equal(got.mask.cpu(), expect.mask)
    if scored:  # the bonus moved the selection
        assert not torch.equal(expect.mask, top_p_select(q, k, keep_p, valid, num_recent=8, num_random=8, seed=2).mask)


def test_selection_scores_in_fp32_inside_bf16_autocast():
    """train.py runs rollouts under bf16 autocast: the probe scores must stay fp32 there (autocast would run the
    reference's einsums in bf16), so both backends pick the tokens the fp32 computation picks."""
    q, k, _ = qkv(2, 4, 2, 48, 16, seed=13, dtype=torch.bfloat16)
    valid = torch.ones(2, 48, dtype=torch.bool)
    valid[0, :10] = False
    args, probes = dict(num_recent=8, num_random=8, seed=2), probe_indices(valid, 8, 8, seed=2)
    expect = top_p_select(q.float(), k.float(), 0.8, valid, **args)
    with torch.autocast(DEVICE, torch.bfloat16):
        mass, _ = probe_column_mass(q.float(), k.float(), valid, *probes)
        torch_sel = top_p_select(q, k, 0.8, valid, **args)
        triton_sel = zipr1_kernels.top_p_select(q.to(DEVICE), k.to(DEVICE), 0.8, valid.to(DEVICE), backend="triton", **args)
    assert mass.dtype == torch.float32
    torch.testing.assert_close(mass, probe_column_mass(q.float(), k.float(), valid, *probes)[0])
    for got in (torch_sel, triton_sel):
        assert torch.equal(got.mask.cpu(), expect.mask) and torch.equal(got.count.cpu(), expect.count)


def test_auto_backend_follows_device_and_environment(monkeypatch):
    q, k, v = (t.to(DEVICE) for t in qkv(1, 2, 1, 12, 16, seed=0, dtype=torch.float32))
    mask = selection("random", 1, 12, seed=0).to(DEVICE)
    monkeypatch.delenv(zipr1_kernels.ENV_VAR, raising=False)
    assert zipr1_kernels.use_triton(q) == q.is_cuda  # Triton on CUDA, the torch reference on the CPU
    monkeypatch.setenv(zipr1_kernels.ENV_VAR, "triton")
    assert zipr1_kernels.use_triton(q) and not zipr1_kernels.use_triton(q, backend="torch")
    monkeypatch.setenv(zipr1_kernels.ENV_VAR, "torch")
    assert not zipr1_kernels.use_triton(q) and zipr1_kernels.use_triton(q, backend="triton")
    torch.testing.assert_close(zipr1_kernels.prefill_sparse_attention(q, k, v, mask),
                               sparse_attention(q, k, v, mask, mask))
    monkeypatch.setenv(zipr1_kernels.ENV_VAR, "cuda")
    with pytest.raises(ValueError, match=zipr1_kernels.ENV_VAR):
        zipr1_kernels.use_triton(q)


def test_importing_kernels_needs_no_triton():
    """With triton unimportable, `import zipr1_kernels` works, auto runs torch, and forcing Triton says why it cannot."""
    code = (
        "import sys; sys.modules['triton'] = None\n"
        "import torch, zipr1_kernels\n"
        "q = torch.randn(1, 2, 8, 16); k = torch.randn(1, 1, 8, 16); m = torch.ones(1, 8, dtype=torch.bool)\n"
        "assert zipr1_kernels.prefill_sparse_attention(q, k, k, m).shape == q.shape\n"
        "try:\n    zipr1_kernels.prefill_sparse_attention(q, k, k, m, backend='triton')\n"
        "except RuntimeError as e:\n    assert 'triton package is not installed' in str(e)\n"
        "else:\n    raise SystemExit('forced triton did not fail')\n"
    )
    env = {**os.environ, "PYTHONPATH": ROOT}
    env.pop(zipr1_kernels.ENV_VAR, None)
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_bad_inputs_get_one_clear_error():
    q, k, v = qkv(2, 4, 2, 12, 16, seed=0, dtype=torch.float32)
    mask = torch.ones(2, 12, dtype=torch.bool)
    with pytest.raises(ValueError, match="bool tensor"):
        zipr1_kernels.prefill_sparse_attention(q, k, v, mask[:, :5])
    with pytest.raises(ValueError, match="multiple of the KV heads"):
        zipr1_kernels.prefill_sparse_attention(q[:, :3], k, v, mask)
    with pytest.raises(ValueError, match="backend must be"):
        zipr1_kernels.prefill_sparse_attention(q, k, v, mask, backend="cuda")
    with pytest.raises(ValueError, match="head_dim"):
        zipr1_kernels.prefill_sparse_attention(q[..., :12], k[..., :12], v[..., :12], mask, backend="triton")
    with pytest.raises(ValueError, match="valid must be"):
        zipr1_kernels.top_p_select(q, k, 0.9, valid=mask[:1], backend="triton")
    with pytest.raises(ValueError, match="one query"):
        zipr1_kernels.decode_attention(q, k, v, mask)
    with pytest.raises(ValueError, match="share a dtype"):  # e.g. fp32 q, k after rope beside a bf16 v
        zipr1_kernels.prefill_sparse_attention(q, k, v.bfloat16(), mask)
    with pytest.raises(ValueError, match="no backward"):
        zipr1_kernels.decode_attention(q[:, :, :1].requires_grad_(), k, v, mask, backend="triton")


# ------------------------------------------------------------------------------------------ the runtime fall-back
def compile_error(*args, **kwargs):
    """What Triton raises when a kernel does not compile (here with a made-up message)."""
    from triton.compiler.errors import CompilationError
    raise CompilationError("s = tl.dot(q, k)", ast.parse("s = tl.dot(q, k)").body[0], "made-up compile error")


@pytest.fixture
def pretend_gpu(monkeypatch):
    """"auto" decides as it would on CUDA (the kernels themselves run in the interpreter), nothing failed so far."""
    monkeypatch.delenv(zipr1_kernels.ENV_VAR, raising=False)
    monkeypatch.setattr(zipr1_kernels, "on_cuda", lambda x: True)
    monkeypatch.setattr(zipr1_kernels, "FAILED", set())


def fallback_warnings(record) -> list[str]:
    return [str(w.message) for w in record if "zipr1_kernels" in str(w.message)]


def test_a_kernel_that_fails_to_compile_warns_once_and_runs_the_torch_reference(pretend_gpu, monkeypatch):
    sparse_attn = importlib.import_module("zipr1_kernels.sparse_attn")
    calls = []
    monkeypatch.setattr(sparse_attn, "_forward", lambda *a: calls.append(1) or compile_error())
    q, k, v = (t.to(DEVICE) for t in qkv(2, 4, 2, 20, 16, seed=21, dtype=torch.float32))
    mask = selection("left_padded", 2, 20, seed=21).to(DEVICE)
    assert zipr1_kernels.use_triton(q)  # "auto" picks Triton here...
    with pytest.warns(RuntimeWarning) as record:
        outs = [zipr1_kernels.prefill_sparse_attention(q, k, v, mask) for _ in range(3)]
    messages = fallback_warnings(record)
    assert len(messages) == 1 and len(calls) == 1  # ...warns once, and the broken kernel is not tried again
    assert "\n" not in messages[0] and "ZIPR1_ATTN_BACKEND=torch" in messages[0]
    assert "CompilationError: made-up compile error" in messages[0]
    reference = gathered_sparse_attention(q, k, v, mask)
    assert all(torch.equal(out, reference) for out in outs)  # the torch path ran
    torch.testing.assert_close(outs[0].double(), sparse_attention(q.double(), k.double(), v.double(), mask, mask),
                               atol=2e-5, rtol=2e-5)  # and it is Eq. 2
    from triton.compiler.errors import CompilationError
    with pytest.raises(CompilationError):  # a forced backend still raises
        zipr1_kernels.prefill_sparse_attention(q, k, v, mask, backend="triton")


def test_a_failing_triton_backward_falls_back_to_the_reference_gradients(pretend_gpu, monkeypatch):
    """The forward stays on Triton (so activation checkpointing recomputes what it saved); the gradients come from
    the torch reference, recomputed from the saved tensors."""
    sparse_attn = importlib.import_module("zipr1_kernels.sparse_attn")
    forwards, backwards = [], []
    real_forward = sparse_attn._forward
    monkeypatch.setattr(sparse_attn, "_forward", lambda *a: forwards.append(1) or real_forward(*a))
    monkeypatch.setattr(sparse_attn, "_backward", lambda *a: backwards.append(1) or compile_error())
    tensors = qkv(2, 4, 2, 24, 16, seed=22)
    mask = selection("random", 2, 24, seed=22)
    weight = torch.randn(2, 4, 24, 16, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    expect = outputs_and_grads(lambda *t: sparse_attention(*t, mask, mask), tensors, torch.float64, weight)
    with pytest.warns(RuntimeWarning) as record:
        runs = [outputs_and_grads(lambda *t: zipr1_kernels.prefill_sparse_attention(*t, mask.to(t[0].device)),
                                  tensors, torch.float32, weight, DEVICE) for _ in range(2)]
    messages = fallback_warnings(record)
    assert len(messages) == 1 and "prefill backward" in messages[0] and "ZIPR1_ATTN_BACKEND=torch" in messages[0]
    assert len(forwards) == 2 and len(backwards) == 1
    for got in runs:
        for name, a, b in zip(["out", "dq", "dk", "dv"], got, expect):
            torch.testing.assert_close(a, b, atol=2e-5, rtol=2e-5, msg=lambda m: f"{name}: {m}")
    with pytest.raises(Exception, match="made-up compile error"):
        outputs_and_grads(triton_prefill(mask), tensors, torch.float32, weight, DEVICE)


def test_failing_decode_and_probe_kernels_fall_back_to_torch(pretend_gpu, monkeypatch):
    from triton.runtime.errors import OutOfResources

    def out_of_shared_memory(*args, **kwargs):
        raise OutOfResources(232448, 166912, "shared memory")

    for module, launcher in (("decode", "decode_attention_triton"), ("probe", "probe_column_mass_triton")):
        monkeypatch.setattr(importlib.import_module(f"zipr1_kernels.{module}"), launcher, out_of_shared_memory)
    q, k, v, valid = (t.to(DEVICE, torch.float32) if t.is_floating_point() else t.to(DEVICE) for t in decode_cache(9))
    qs, ks, _ = (t.to(DEVICE) for t in qkv(2, 4, 2, 48, 16, seed=13, dtype=torch.float32))
    with pytest.warns(RuntimeWarning) as record:
        out = zipr1_kernels.decode_attention(q, k, v, valid)
        sel = zipr1_kernels.top_p_select(qs, ks, 0.8, num_recent=8, num_random=8, seed=2)
        zipr1_kernels.decode_attention(q, k, v, valid)
    messages = fallback_warnings(record)
    assert len(messages) == 2 and all("OutOfResources" in m and "ZIPR1_ATTN_BACKEND=torch" in m for m in messages)
    assert torch.equal(out, zipr1_kernels.decode_attention_torch(q, k, v, valid))
    expect = top_p_select(qs, ks, 0.8, num_recent=8, num_random=8, seed=2)
    assert torch.equal(sel.mask, expect.mask) and torch.equal(sel.count, expect.count)


# ------------------------------------------------------------------------------ benchmarks/ragged_check.py, small
def ragged_check():
    spec = importlib.util.spec_from_file_location("ragged_check", os.path.join(ROOT, "benchmarks", "ragged_check.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_ragged_check_builds_ragged_rows_and_catches_a_wrong_kernel(monkeypatch):
    """The GPU script's pieces at tiny shapes (gpu_check.sh --dry-run runs all of it): per-row counts, every check
    within tolerance on the real kernels, a 5% error in one kernel failing its check."""
    rc = ragged_check()
    args = rc.parse_args(["--dry-run"])
    args.length = 24  # fewer probes: seconds in the interpreter
    q, k, v, valid, mask, tau = rc.ragged_batch(args, torch.device(DEVICE))
    valid, mask = valid.cpu(), mask.cpu()
    assert torch.equal(mask.sum(-1), (tau * valid.sum(-1)).round().long().clamp(min=1))  # k_b = round(τ_b · length_b)
    assert mask[:, -1].all() and not (mask & ~valid).any() and len(set(mask.sum(-1).tolist())) > 1
    rows, mask, valid = [0, 1, 3], mask.to(DEVICE), valid.to(DEVICE)
    checks = [rc.check_forward(q, k, v, mask, rows), rc.check_decode(k, v, mask, 4, rows),
              rc.check_probe(q, k, valid, rows)]
    assert all(err <= tol for err, tol, _ in checks), checks
    decode = zipr1_kernels.decode_attention
    monkeypatch.setattr(zipr1_kernels, "decode_attention", lambda *a, **kw: decode(*a, **kw) * 1.05)
    err, tol, _ = rc.check_decode(k, v, mask, 4, rows)
    assert err > tol


def test_ragged_check_shapes_pass_int32_offsets_where_the_docstring_says():
    rc = ragged_check()
    args = rc.parse_args([])
    q = torch.empty(args.batch, args.length, args.heads, args.head_dim, device="meta").transpose(1, 2)
    k = torch.empty(args.batch, args.length, args.kv_heads, args.head_dim, device="meta").transpose(1, 2)
    assert q.numel() == 2 ** 32 and k.numel() == 2 ** 29
    line = rc.offsets_line(q, k)
    assert "q and output 4294967296 elements (2^32.0, beyond int32)" in line and "samples ≥ 32 start past 2^31" in line
    assert "k and v each 536870912 elements (2^29.0, within int32)" in line
