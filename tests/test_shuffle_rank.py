"""shuffle_rank_loss: every backend vs a float64 literal transcription (forward, accuracy, gradients of
anchor, anchor2 and shuffled), odd shapes, caps, gradcheck, errors, AOT compilation, segment permutations."""
import itertools
import math

import pytest
import torch
import torch.nn.functional as F

import dualvar.kernels as K
from conftest import cpu_backends, needs_gpu
from dualvar.kernels import shuffle_rank as SR

INF = math.inf


def literal(anchor, shuffled, perm, theta, cap):
    """Loop-by-loop float64 transcription of METHOD.md 3.3 with the reference's scatter calibration
    (out[b, perm[b, j]] = y[b, j]) and naive log(1 + exp(min(x, cap))). Returns (R, accuracy)."""
    a, y = anchor.double(), shuffled.double()
    B, s, _ = a.shape
    p = F.normalize(y, dim=-1, eps=1e-12)
    p = p.scatter(1, perm.unsqueeze(-1).expand_as(p), p)
    total, n, correct = 0.0, 0, 0
    for b in range(B):
        X = torch.cat([a[b], p[b]])
        for i in range(2 * s):
            c = (i + s) % (2 * s)
            pos = X[i] @ X[c]
            best = True
            for j in range(2 * s):
                if j in (i, c):
                    continue
                x = (X[i] @ X[j] - pos) / theta
                total = total + torch.log(1 + torch.exp(torch.clamp(x, max=cap)))
                n += 1
                best = best and bool(X[i] @ X[j] <= pos)
            correct += best
    return total / n, correct / (B * 2 * s)


def make(B, s, d, gen, dtype=torch.float64, scale_y=1.0):
    a = F.normalize(torch.randn(B, s, d, generator=gen, dtype=torch.float64), dim=-1)
    a2 = F.normalize(torch.randn(B, s, d, generator=gen, dtype=torch.float64), dim=-1)
    y = torch.randn(B, s, d, generator=gen, dtype=torch.float64) * scale_y
    perm = torch.rand(B, s, generator=gen).argsort(dim=1)
    return a.to(dtype), a2.to(dtype), y.to(dtype), perm


def reference_with_grads(a, a2, y, perm, theta, cap, w0, w2):
    xs = [t.detach().double().requires_grad_(True) for t in (a, a2, y)]
    r0 = SR.shuffle_rank_loss_reference(xs[0], xs[2], perm, theta, cap=cap, weight=w0)
    r2 = SR.shuffle_rank_loss_reference(xs[1], xs[2], perm, theta, cap=cap, weight=w2)
    grads = torch.autograd.grad(r0 + r2, xs)
    acc = (SR.shuffle_rank_accuracy_reference(xs[0], xs[2], perm), SR.shuffle_rank_accuracy_reference(xs[1], xs[2], perm))
    return torch.stack([r0, r2]).detach(), torch.stack(acc).detach(), grads


def run(backend, a, a2, y, perm, theta, cap, w0, w2, dtype):
    xs = [t.detach().to(dtype).requires_grad_(True) for t in (a, a2, y)]
    res = K.shuffle_rank_loss(xs[0], xs[2], perm, theta, cap=cap, weight=w0, anchor2=xs[1], weight2=w2,
                              return_parts=True, backend=backend)
    assert K.last_backend("shuffle_rank") == backend
    (res.terms * torch.tensor([1.0, 0.5], dtype=res.terms.dtype)).sum().backward()  # distinct upstream grads
    return res, [t.grad for t in xs]


def test_reference_matches_literal_loops(gen):
    a, _, y, perm = make(3, 3, 5, gen)
    for theta, cap in ((0.05, 5.0), (0.05, INF), (0.7, 5.0)):
        r, acc = literal(a, y, perm, theta, cap)
        torch.testing.assert_close(SR.shuffle_rank_loss_reference(a, y, perm, theta, cap=cap), r, rtol=1e-12, atol=0)
        assert float(SR.shuffle_rank_accuracy_reference(a, y, perm)) == pytest.approx(acc)


TOL = {torch.float64: 1e-10, torch.float32: 2e-5, torch.float16: 2e-2, torch.bfloat16: 6e-2}
SHAPES = [(1, 2, 7), (3, 3, 64), (17, 2, 130), (4, 5, 1), (2, 8, 33), (5, 2, 512)]


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("B,s,d", SHAPES)
@pytest.mark.parametrize("theta,cap", [(0.05, 5.0), (0.05, INF), (0.9, 5.0), (0.05, 0.3)])
def test_backends_equal_reference(backend, B, s, d, theta, cap, gen):
    if backend == "triton" and B * s * d > 6000:
        B = 2  # the interpreter is slow; shapes stay odd
    a, a2, y, perm = make(B, s, d, gen, scale_y=3.0)
    dtype = torch.float64 if backend in ("cpu", "torch") else torch.float32
    terms_ref, acc_ref, grads_ref = reference_with_grads(a, a2, y, perm, theta, cap, 0.5, 0.7)
    # reference gradients for upstream (1, 0.5)
    xs = [t.detach().double().requires_grad_(True) for t in (a, a2, y)]
    r = (SR.shuffle_rank_loss_reference(xs[0], xs[2], perm, theta, cap=cap, weight=0.5)
         + 0.5 * SR.shuffle_rank_loss_reference(xs[1], xs[2], perm, theta, cap=cap, weight=0.7))
    grads_ref = torch.autograd.grad(r, xs)
    res, grads = run(backend, a, a2, y, perm, theta, cap, 0.5, 0.7, dtype)
    tol = TOL[dtype]
    torch.testing.assert_close(res.terms.double(), terms_ref, rtol=tol, atol=tol)
    torch.testing.assert_close(res.loss.double(), terms_ref.sum(), rtol=tol, atol=tol)
    torch.testing.assert_close(res.accuracy.double(), acc_ref, rtol=0, atol=1e-6)
    for g, gr in zip(grads, grads_ref):
        assert g.dtype == dtype
        torch.testing.assert_close(g.double(), gr, rtol=tol, atol=tol * max(1.0, float(gr.abs().max())))


@pytest.mark.parametrize("backend", cpu_backends())
def test_single_anchor_and_scalar_return(backend, gen):
    a, _, y, perm = make(3, 2, 9, gen)
    dtype = torch.float32
    ref = SR.shuffle_rank_loss_reference(a, y, perm, 0.05, cap=5.0, weight=0.3)
    out = K.shuffle_rank_loss(a.to(dtype), y.to(dtype), perm, 0.05, cap=5.0, weight=0.3, backend=backend)
    assert out.dim() == 0
    torch.testing.assert_close(out.double(), ref, rtol=2e-5, atol=2e-6)
    ya = y.to(dtype).requires_grad_(True)
    aa = a.to(dtype).requires_grad_(True)
    K.shuffle_rank_loss(aa, ya, perm, 0.05, weight=0.3, backend=backend).backward()
    yr, ar = y.clone().requires_grad_(True), a.clone().requires_grad_(True)
    SR.shuffle_rank_loss_reference(ar, yr, perm, 0.05, weight=0.3).backward()
    torch.testing.assert_close(ya.grad.double(), yr.grad, rtol=2e-5, atol=2e-6)
    torch.testing.assert_close(aa.grad.double(), ar.grad, rtol=2e-5, atol=2e-6)


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_error_at_most_twice_torch(backend, dtype, gen):
    """flash-attention's rule: a low-precision kernel's error vs the fp64 reference is at most about
    twice that of plain torch computing in the same dtype."""
    a, a2, y, perm = make(17, 2, 64, gen, scale_y=2.0)
    ref, _, grads_ref = reference_with_grads(a, a2, y, perm, 0.05, 5.0, 0.5, 0.5)
    naive = [t.to(dtype).requires_grad_(True) for t in (a, a2, y)]
    r = (SR.shuffle_rank_loss_reference(naive[0], naive[2], perm, 0.05, weight=0.5)
         + SR.shuffle_rank_loss_reference(naive[1], naive[2], perm, 0.05, weight=0.5))
    r.backward()
    xs = [t.to(dtype).requires_grad_(True) for t in (a, a2, y)]
    res = K.shuffle_rank_loss(xs[0], xs[2], perm, 0.05, weight=0.5, anchor2=xs[1], return_parts=True, backend=backend)
    res.loss.backward()
    assert float((res.loss.detach().double() - ref.sum()).abs()) <= 2 * float((r.detach().double() - ref.sum()).abs()) + 1e-3
    for x, n, gr in zip(xs, naive, grads_ref):
        assert x.grad.dtype == dtype
        assert float((x.grad.double() - gr).abs().max()) <= 2 * float((n.grad.double() - gr).abs().max()) + 1e-3


def test_gradcheck_cpu_backend_float64(gen):
    a, a2, y, perm = make(3, 3, 5, gen, scale_y=2.0)
    xs = [t.clone().requires_grad_(True) for t in (a, a2, y)]

    def f(a_, a2_, y_):
        return K.shuffle_rank_loss(a_, y_, perm, 0.5, cap=5.0, weight=0.5, anchor2=a2_, weight2=0.7,
                                   return_parts=True, backend="cpu").terms

    assert torch.autograd.gradcheck(f, xs, eps=1e-6, atol=1e-8)
    assert K.last_backend("shuffle_rank") == "cpu"

    def g(a_, y_):  # single anchor, cap active on some terms (theta small)
        return K.shuffle_rank_loss(a_, y_, perm, 0.05, cap=2.0, backend="cpu")

    assert torch.autograd.gradcheck(g, (xs[0], xs[2]), eps=1e-7, atol=1e-6)


@pytest.mark.parametrize("backend", cpu_backends())
def test_cap_kills_gradient_and_inf_cap_does_not(backend, gen):
    """Constructed sample: a negative beats the counterpart by far more than cap * theta."""
    d = 4
    e = torch.eye(d, dtype=torch.float64)
    a = torch.stack([e[0], e[1]]).unsqueeze(0)  # anchors a0, a1
    y = torch.stack([e[1] * 2.0, e[0] * 0.5]).unsqueeze(0)  # p: y0 -> slot 1 (= a1), y1 -> slot 0 (= a0)
    perm = torch.tensor([[0, 1]])  # calibration keeps slots: p0 = e1, p1 = e0 -> every counterpart is a negative's mirror
    dtype = torch.float64 if backend != "triton" else torch.float32
    for cap in (5.0, INF):
        ref = SR.shuffle_rank_loss_reference(a, y, perm, 0.05, cap=cap)
        x = [a.to(dtype).requires_grad_(True), y.to(dtype).requires_grad_(True)]
        res = K.shuffle_rank_loss(x[0], x[1], perm, 0.05, cap=cap, return_parts=True, backend=backend)
        res.loss.backward()
        torch.testing.assert_close(res.loss.double(), ref, rtol=1e-5, atol=1e-6)
        assert float(res.accuracy[0]) == 0.0
        if cap == 5.0:
            assert res.loss.item() > math.log1p(math.exp(5.0)) * 0.4  # saturated terms present
        else:
            assert res.loss.item() > 10  # uncapped: x = 20 per mis-ranked term
            assert float(x[1].grad.abs().max()) > 0


@pytest.mark.parametrize("backend", cpu_backends())
def test_order_of_shuffled_rows_is_folded_into_indexing(backend, gen):
    """Permuting the stored shuffled rows together with perm does not change the loss: calibration is
    pure indexing. And the identity permutation equals ranking against normalize(shuffled) directly."""
    a, a2, y, perm = make(5, 4, 6, gen)
    dtype = torch.float64 if backend != "triton" else torch.float32
    base = K.shuffle_rank_loss(a.to(dtype), y.to(dtype), perm, 0.1, backend=backend)
    sigma = torch.tensor([2, 0, 3, 1])
    again = K.shuffle_rank_loss(a.to(dtype), y[:, sigma].to(dtype), perm[:, sigma], 0.1, backend=backend)
    torch.testing.assert_close(base, again, rtol=1e-5, atol=1e-6)
    ident = torch.arange(4).expand(5, 4).contiguous()
    direct = SR.shuffle_rank_loss_reference(a, F.normalize(y, dim=-1), ident, 0.1)
    torch.testing.assert_close(K.shuffle_rank_loss(a.to(dtype), y.to(dtype), ident, 0.1, backend=backend).double(),
                               direct, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", [b for b in cpu_backends() if b != "torch"])
def test_non_contiguous_inputs(backend, gen):
    a, a2, y, perm = make(4, 3, 10, gen)
    dtype = torch.float64 if backend == "cpu" else torch.float32
    big = torch.randn(4, 6, 20, generator=gen, dtype=torch.float64)
    y_nc = big[:, ::2, :10].clone()
    big[:, ::2, :10] = y_nc
    y_view = big[:, ::2, :10]  # strided rows, unit stride along d
    a_t = a.transpose(0, 1).contiguous().transpose(0, 1)  # batch-strided
    ref = SR.shuffle_rank_loss_reference(a, y_nc, perm, 0.05)
    out = K.shuffle_rank_loss(a_t.to(dtype), y_view.to(dtype), perm, 0.05, backend=backend)
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-6)


def test_zero_norm_shuffled_row_is_finite(gen):
    a, _, y, perm = make(2, 2, 5, gen)
    y[0, 1] = 0.0
    outs = {}
    for backend in cpu_backends():
        ya = y.clone().float().requires_grad_(True)
        out = K.shuffle_rank_loss(a.float(), ya, perm, 0.05, backend=backend)
        out.backward()
        assert torch.isfinite(out) and bool(torch.isfinite(ya.grad).all())
        outs[backend] = (out.item(), ya.grad)
    for b, (v, g) in outs.items():
        assert v == pytest.approx(outs["torch"][0], rel=1e-5)
        torch.testing.assert_close(g, outs["torch"][1], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_bad_inputs_name_the_problem(backend, gen):
    a, a2, y, perm = make(3, 2, 4, gen, dtype=torch.float32)
    call = lambda **kw: K.shuffle_rank_loss(**{"anchor": a, "shuffled": y, "perm": perm, "backend": backend, **kw})
    with pytest.raises(ValueError, match=r"\(B, s, d\)"):
        call(anchor=a[0])
    with pytest.raises(ValueError, match="2 to 8 series"):
        call(anchor=a[:, :1], shuffled=y[:, :1], perm=perm[:, :1])
    with pytest.raises(ValueError, match="2 to 8 series"):
        big = torch.randn(3, 9, 4)
        call(anchor=big, shuffled=big, perm=torch.arange(9).repeat(3, 1))
    with pytest.raises(ValueError, match="d must be in 1..512"):
        big = torch.randn(3, 2, 513)
        call(anchor=big, shuffled=big)
    with pytest.raises(ValueError, match="permutation"):
        call(perm=torch.zeros(3, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="perm must be int64"):
        call(perm=perm.int())
    with pytest.raises(TypeError, match="float16, bfloat16 or float64"):
        call(anchor=a.int(), shuffled=y.int())
    with pytest.raises(TypeError, match="use one dtype"):
        call(shuffled=y.double())
    with pytest.raises(ValueError, match="anchor2 must have"):
        call(anchor2=a2[:2])
    with pytest.raises(ValueError, match="theta"):
        call(theta=0.0)
    with pytest.raises(ValueError, match="cap"):
        call(cap=float("nan"))


def test_compiled_op_checks_inputs_itself(gen):
    a, _, y, perm = make(3, 2, 4, gen, dtype=torch.float32)
    with pytest.raises(RuntimeError, match="not a permutation"):
        torch.ops.dualvar.shuffle_rank_fwd(a, None, y, torch.zeros_like(perm), 20.0, 5.0, 1.0, 0.0, 1.0)
    with pytest.raises(RuntimeError, match="s must be in 2..8"):
        torch.ops.dualvar.shuffle_rank_fwd(a[:, :1], None, y[:, :1], perm[:, :1], 20.0, 5.0, 1.0, 0.0, 1.0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("two", [False, True])
def test_compiled_ops_pass_opcheck(dtype, two, gen):
    """Schema, fake (meta) functions and dispatcher registration agree (torch.library.opcheck)."""
    assert not SR._compiled_op_missing()  # also registers the fake functions
    a, a2, y, perm = make(3, 3, 5, gen, dtype=dtype)
    a2 = a2 if two else None
    fwd_args = (a, a2, y, perm, 20.0, 5.0, 0.1, 0.2 if two else 0.0, 0.05)
    torch.library.opcheck(torch.ops.dualvar.shuffle_rank_fwd.default, fwd_args)
    grad = torch.rand(2 if two else 1, generator=gen)
    torch.library.opcheck(torch.ops.dualvar.shuffle_rank_bwd.default, (a, a2, y, perm, grad, 20.0, 5.0, 0.3, 0.4))


def test_float64_refused_on_gpu_backends():
    with pytest.raises(K.BackendUnavailable):
        a = torch.randn(2, 2, 3, dtype=torch.float64)
        K.shuffle_rank_loss(a, a, torch.tensor([[0, 1], [1, 0]]), backend="cuda")


def test_auto_picks_compiled_cpu_kernel(gen):
    a, _, y, perm = make(2, 2, 3, gen, dtype=torch.float32)
    K.shuffle_rank_loss(a, y, perm)
    assert K.last_backend("shuffle_rank") == "cpu"


# ------------------------------------------------------------------ ahead-of-time compilation
def _sigs(dt):
    common = dict(B="i32", s="i32", d="i32", per_prog="i32", s_ab="i32", s_as="i32", s_a2b="i32", s_a2s="i32",
                  s_yb="i32", s_ys="i32", inv_theta="fp32", cap="fp32")
    fwd = dict(a_ptr=f"*{dt}", a2_ptr=f"*{dt}", y_ptr=f"*{dt}", perm_ptr="*i64", out_ptr="*fp32", **common,
               coef0="fp32", coef2="fp32", acc_scale="fp32")
    bwd = dict(a_ptr=f"*{dt}", a2_ptr=f"*{dt}", y_ptr=f"*{dt}", perm_ptr="*i64", g_ptr="*fp32", g_stride="i32",
               da_ptr=f"*{dt}", da2_ptr=f"*{dt}", dy_ptr=f"*{dt}", **common, gcoef0="fp32", gcoef2="fp32")
    # keep the launcher's argument order
    order = lambda kern, sig: {k: sig[k] for k in kern.arg_names if k in sig}
    return order(SR._shuffle_rank_fwd_kernel, fwd), order(SR._shuffle_rank_bwd_kernel, bwd)


AOT_CASES = [(2, 64, "fp32", True), (2, 64, "bf16", True), (2, 64, "fp16", False), (2, 512, "bf16", True),
             (3, 130, "fp32", True), (4, 512, "bf16", True), (8, 512, "bf16", True), (8, 64, "fp32", False)]


def _aot_compile_all():
    """Compile every case for sm_90 and sm_80 and print the reports as JSON (run without the interpreter:
    under TRITON_INTERPRET=1 the kernels' @triton.jit helpers are interpreter objects)."""
    import dataclasses
    import json
    from dualvar.kernels import _aot
    reports = []
    for (s, d, dt, two), arch in itertools.product(AOT_CASES, (90, 80)):
        SP, BLOCK_D, num_warps, _ = SR.triton_config(s, d, 4096)
        fwd, bwd = _sigs(dt)
        for kern, sig in ((SR._shuffle_rank_fwd_kernel, fwd), (SR._shuffle_rank_bwd_kernel, bwd)):
            rep = _aot.compile_for(kern, sig, dict(TWO=two, SP=SP, BLOCK_D=BLOCK_D, EPS_=SR.EPS), arch,
                                   num_warps=num_warps)
            reports.append(dict(case=[s, d, dt, two], within=rep.within_limits(), **dataclasses.asdict(rep)))
    print(json.dumps(reports))


@pytest.fixture(scope="module")
def aot_reports():
    import json
    import os
    import subprocess
    import sys
    here = os.path.dirname(os.path.abspath(__file__))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = here + os.pathsep + env.get("PYTHONPATH", "")
    out = subprocess.run([sys.executable, "-c", "import test_shuffle_rank as t; t._aot_compile_all()"],
                         cwd=here, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_triton_kernels_compile_within_limits(aot_reports):
    assert len(aot_reports) == len(AOT_CASES) * 2 * 2
    for rep in aot_reports:
        assert rep["arch"] in (80, 90)
        assert rep["within"] and rep["registers"] <= 255, rep
        assert rep["spill_stores"] == 0 and rep["spill_loads"] == 0, rep


def test_triton_config_fails_clearly():
    with pytest.raises(ValueError, match="supports"):
        SR.triton_config(9, 64, 10)
    with pytest.raises(ValueError, match="supports"):
        SR.triton_config(2, 513, 10)


# ------------------------------------------------------------------ segment permutations
def test_random_segment_permutation_uniform_and_valid():
    g = torch.Generator().manual_seed(7)
    for s in (2, 3):
        perm = K.random_segment_permutation(6000, s, generator=g)
        assert perm.dtype == torch.int64 and perm.shape == (6000, s)
        assert torch.equal(perm.sort(1).values, torch.arange(s).expand(6000, s))
        rows, counts = torch.unique(perm, dim=0, return_counts=True)
        n = math.factorial(s)
        assert len(rows) == n
        expected = 6000 / n
        chi2 = float(((counts.double() - expected) ** 2 / expected).sum())
        assert chi2 < {2: 10.8, 3: 20.5}[s]  # p = 0.001 quantiles of chi-square with n - 1 dof
    # identity allowed by default (reference behaviour): about half the rows for s = 2
    ident = (K.random_segment_permutation(4000, 2, generator=g) == torch.arange(2)).all(1).double().mean()
    assert 0.45 < float(ident) < 0.55


@pytest.mark.parametrize("s", [2, 3, 5])
def test_derangement_has_no_fixed_points(s):
    g = torch.Generator().manual_seed(3)
    perm = K.random_segment_permutation(3000, s, generator=g, derangement=True)
    assert not bool((perm == torch.arange(s)).any())
    assert torch.equal(perm.sort(1).values, torch.arange(s).expand(3000, s))
    if s == 3:  # both 3-cycles, evenly
        assert len(torch.unique(perm, dim=0)) == 2


def test_ranks_draw_different_permutations():
    """The reference seeded numpy identically on every rank, so all ranks drew the same permutations.
    Generators seeded per rank must not."""
    base_seed = 1234
    per_rank = [K.random_segment_permutation(64, 2, generator=torch.Generator().manual_seed(base_seed + rank))
                for rank in range(4)]
    for p, q in itertools.combinations(per_rank, 2):
        assert not torch.equal(p, q)
    # and successive steps on one rank differ too
    g = torch.Generator().manual_seed(base_seed)
    assert not torch.equal(K.random_segment_permutation(64, 3, generator=g), K.random_segment_permutation(64, 3, generator=g))
    # same seed -> same draws (reproducible)
    assert torch.equal(per_rank[0], K.random_segment_permutation(64, 2, generator=torch.Generator().manual_seed(base_seed)))


# ------------------------------------------------------------------ GPU
@needs_gpu
@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("B,s,d,cap", [(1, 2, 7, 5.0), (17, 3, 130, INF), (4096, 2, 64, 5.0), (33, 8, 512, INF),
                                       (5, 5, 1, 5.0)])
def test_gpu_backends_equal_reference(backend, dtype, B, s, d, cap, gen):
    a, a2, y, perm = make(B, s, d, gen, scale_y=2.0)
    xs = [t.to(dtype).cuda().requires_grad_(True) for t in (a, a2, y)]
    res = K.shuffle_rank_loss(xs[0], xs[2], perm.cuda(), 0.05, cap=cap, weight=0.5, anchor2=xs[1], weight2=0.7,
                              return_parts=True, backend=backend)
    assert K.last_backend("shuffle_rank") == backend
    (res.terms * torch.tensor([1.0, 0.5], device="cuda")).sum().backward()
    ref_in = [t.detach().cpu().to(dtype).double().requires_grad_(True) for t in xs]  # same rounded inputs
    r = (SR.shuffle_rank_loss_reference(ref_in[0], ref_in[2], perm, 0.05, cap=cap, weight=0.5)
         + 0.5 * SR.shuffle_rank_loss_reference(ref_in[1], ref_in[2], perm, 0.05, cap=cap, weight=0.7))
    r.backward()
    acc = torch.stack([SR.shuffle_rank_accuracy_reference(ref_in[0], ref_in[2], perm),
                       SR.shuffle_rank_accuracy_reference(ref_in[1], ref_in[2], perm)])
    tol = {torch.float32: 1e-4, torch.bfloat16: 2e-2, torch.float16: 5e-3}[dtype]
    terms = torch.stack([SR.shuffle_rank_loss_reference(ref_in[0], ref_in[2], perm, 0.05, cap=cap, weight=0.5),
                         SR.shuffle_rank_loss_reference(ref_in[1], ref_in[2], perm, 0.05, cap=cap, weight=0.7)])
    torch.testing.assert_close(res.terms.cpu().double(), terms.detach(), rtol=tol, atol=tol)
    torch.testing.assert_close(res.accuracy.cpu().double(), acc.detach(), rtol=0, atol=0.02)
    for x, rx in zip(xs, ref_in):
        gmax = float(rx.grad.abs().max())
        torch.testing.assert_close(x.grad.cpu().double(), rx.grad, rtol=tol * 4, atol=tol * max(gmax, 1e-3))


@needs_gpu
@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_gpu_one_launch_per_direction(backend, gen):
    """Forward and backward are one shuffle-rank kernel each (besides allocation and the output memset)."""
    from torch.profiler import ProfilerActivity, profile
    a, a2, y, perm = make(4096, 2, 64, gen)
    xs = [t.float().cuda().requires_grad_(True) for t in (a, a2, y)]
    perm = perm.cuda()
    run_once = lambda: K.shuffle_rank_loss(xs[0], xs[2], perm, 0.05, weight=0.5, anchor2=xs[1], check_perm=False,
                                           return_parts=True, backend=backend).terms.backward(torch.ones(2, device="cuda"))
    run_once()  # compile / warm up
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        run_once()
        torch.cuda.synchronize()
    names = [e.name for e in prof.events() if e.device_type.name == "CUDA" and "shuffle_rank" in e.name]
    assert len([n for n in names if "fwd" in n]) == 1 and len([n for n in names if "bwd" in n]) == 1, names
