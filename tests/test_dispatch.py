"""The shared kernel infrastructure: backend dispatch over an implementation table, the stale-extension
check, fake (meta) registration, and refusing double backward through a fused backward."""
import warnings

import pytest
import torch

import dualvar.kernels as K
from dualvar.kernels import _dispatch, _ext
from dualvar.kernels._dispatch import OpImpl

TORCH_ONLY = {"torch": OpImpl(lambda x: x)}


def test_explicit_missing_backend_lists_reason():
    with pytest.raises(K.BackendUnavailable, match="has no cuda implementation|needs CUDA tensors"):
        _dispatch.select("demo_op", TORCH_ONLY, torch.device("cpu"), "cuda")
    with pytest.raises(K.BackendUnavailable, match="demo_op has no cpu implementation"):
        _dispatch.select("demo_op", TORCH_ONLY, torch.device("cpu"), "cpu")
    with pytest.raises(K.BackendUnavailable, match="unknown backend"):
        _dispatch.select("demo_op", TORCH_ONLY, torch.device("cpu"), "tpu")


def test_op_veto_reason_is_reported():
    veto = lambda b: "D = 4096 is beyond the kernel's limit" if b == "cpu" else None
    impls = {"torch": OpImpl(None), "cpu": OpImpl(None)}
    with pytest.raises(K.BackendUnavailable, match="4096"):
        _dispatch.select("veto_op", impls, torch.device("cpu"), "cpu", veto)


def test_auto_falls_back_with_one_warning(monkeypatch):
    monkeypatch.setattr(_dispatch, "_WARNED", set())
    # no compiled implementation: auto must fall back to torch
    with pytest.warns(RuntimeWarning, match="falls back to the torch backend"):
        assert _dispatch.select("fallback_op", TORCH_ONLY, torch.device("cpu")) == "torch"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert _dispatch.select("fallback_op", TORCH_ONLY, torch.device("cpu")) == "torch"
    assert K.last_backend("fallback_op") == "torch"


def test_env_var_overrides_auto(monkeypatch):
    video = torch.randint(0, 256, (1, 2, 3, 3, 3), dtype=torch.uint8)
    idx = K.identity_index(1, 2)
    monkeypatch.setenv("DUALVAR_BACKEND", "torch")
    K.permute_frames(video, idx, (0.5,) * 3, (0.5,) * 3)
    assert K.last_backend("permute_frames") == "torch"
    monkeypatch.setenv("DUALVAR_BACKEND", "cuda")
    with pytest.raises(K.BackendUnavailable, match="cuda"):
        K.permute_frames(video, idx, (0.5,) * 3, (0.5,) * 3)


def test_available_backends_reports_reasons():
    avail = K.available_backends("cpu")
    assert avail["torch"] is None and avail["cpu"] is None  # the C++ extension is built in CI
    assert "CUDA" in avail["cuda"]


def test_every_op_table_has_one_shape():
    """Each op's _IMPLS maps backend names to OpImpl(forward, backward)."""
    import importlib
    for name in ("permute_frames", "contrastive", "shuffle_rank"):
        impls = importlib.import_module(f"dualvar.kernels.{name}")._IMPLS
        assert "torch" in impls and set(impls) <= set(K.BACKENDS), name
        assert all(isinstance(impl, OpImpl) and callable(impl.forward) for impl in impls.values()), name


def test_compiled_op_reason_names_missing_ops():
    assert _ext.compiled_op_reason("permute_frames", "contrastive_fwd") is None
    why = _ext.compiled_op_reason("permute_frames", "op_from_newer_sources", "another_one")
    assert "stale" in why and "torch.ops.dualvar.op_from_newer_sources" in why and "another_one" in why
    assert "pip install --no-build-isolation -e ." in why
    assert "permute_frames" not in why


def test_register_fakes_applies_now_and_skips_missing_ops(monkeypatch):
    """Registered at once when the extension is loaded; an op the extension lacks is skipped (no error)."""
    _ext.load_ext()
    calls = []
    monkeypatch.setattr(torch.library, "register_fake", lambda name, fn: calls.append(name))
    monkeypatch.setattr(_ext, "_FAKES", {})
    monkeypatch.setattr(_ext, "_REGISTERED", set())
    _ext.register_fakes({"contrastive_fwd": lambda *a: None, "op_from_newer_sources": lambda *a: None})
    assert calls == ["dualvar::contrastive_fwd"]
    _ext.register_fakes({"permute_frames": lambda *a: None})  # earlier ones are not registered twice
    assert calls == ["dualvar::contrastive_fwd", "dualvar::permute_frames"]


def test_fakes_of_every_op_trace_under_fake_tensors():
    from torch._subclasses.fake_tensor import FakeTensorMode
    _ext.load_ext()
    with FakeTensorMode():
        z = torch.empty(7, 5)
        assert torch.ops.dualvar.contrastive_fwd(z, z, 0.1, 0).shape == (7,)
        dq, dk = torch.ops.dualvar.contrastive_bwd(z, z[:3], torch.empty(7), torch.empty(7), 0.1, None, True, True)
        assert dq.shape == (7, 5) and dk.shape == (3, 5)
        video = torch.empty(2, 4, 3, 5, 3, dtype=torch.uint8)
        out = torch.ops.dualvar.permute_frames(video, torch.empty(2, 6, dtype=torch.long),
                                               torch.empty(3, 256, dtype=torch.bfloat16), None)
        assert out.shape == (2, 3, 6, 3, 5) and out.dtype == torch.bfloat16


class _Square(torch.autograd.Function):
    """x^2 with a hand-written backward marked differentiable once."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x * x

    @staticmethod
    @_dispatch.once_differentiable("square")
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return 2 * x * g


def test_once_differentiable_refuses_second_order_even_with_constant_incoming_gradient():
    """torch's @once_differentiable only looks at the incoming gradient: with a loss's constant g it lets
    the second order through without the kernel's part (silently wrong). Ours raises."""
    x = torch.randn(4, requires_grad=True)
    (g,) = torch.autograd.grad(_Square.apply(x).sum(), x, create_graph=True)
    assert torch.equal(g.detach(), 2 * x.detach())
    with pytest.raises(RuntimeError, match="square: cannot differentiate twice"):
        g.sum().backward()
    x.grad = None
    _Square.apply(x).sum().backward()  # a plain first-order backward is untouched
    assert torch.equal(x.grad, 2 * x.detach())


def test_device_guard_is_a_no_op_on_cpu():
    with _ext.device_guard(torch.zeros(1)):
        pass
