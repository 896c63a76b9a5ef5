"""The backend dispatcher: explicit requests, automatic fallback, the env var, observability."""
import warnings

import pytest
import torch

import dualvar.kernels as K
from dualvar.kernels import _dispatch


def test_explicit_missing_backend_lists_reason():
    with pytest.raises(K.BackendUnavailable, match="has no cuda implementation|needs CUDA tensors"):
        _dispatch.select("demo_op", {"torch": None}, torch.device("cpu"), "cuda")
    with pytest.raises(K.BackendUnavailable, match="demo_op has no cpu implementation"):
        _dispatch.select("demo_op", {"torch": None}, torch.device("cpu"), "cpu")
    with pytest.raises(K.BackendUnavailable, match="unknown backend"):
        _dispatch.select("demo_op", {"torch": None}, torch.device("cpu"), "tpu")


def test_op_veto_reason_is_reported():
    veto = lambda b: "D = 4096 is beyond the kernel's limit" if b == "cpu" else None
    with pytest.raises(K.BackendUnavailable, match="4096"):
        _dispatch.select("veto_op", {"torch": None, "cpu": None}, torch.device("cpu"), "cpu", veto)


def test_auto_falls_back_with_one_warning(monkeypatch):
    monkeypatch.setattr(_dispatch, "_WARNED", set())
    impls = {"torch": None}  # no compiled implementation: auto must fall back to torch
    with pytest.warns(RuntimeWarning, match="falls back to the torch backend"):
        assert _dispatch.select("fallback_op", impls, torch.device("cpu")) == "torch"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert _dispatch.select("fallback_op", impls, torch.device("cpu")) == "torch"
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
