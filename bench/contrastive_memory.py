"""Peak memory of one NT-Xent step in a fresh process (printed in MB, beyond inputs).

    python bench/contrastive_memory.py PROVIDER M D DEVICE DTYPE [PHASE]
PHASE: forward (the loss with its graph), backward (the backward of a forward run before the
measurement starts) or forward+backward (default). CPU: the process's peak resident set over the step
(VmHWM, reset before it); CUDA: torch.cuda.max_memory_allocated beyond what exists before it
(bench_helpers.measure_peak_mb). Providers: reference (plain torch, full matrix), torch, cpu, triton,
cuda, infcl.
"""
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_helpers import measure_peak_mb  # noqa: E402

TAU = 0.07


def loss_fn(provider):
    import dualvar.kernels as K
    if provider == "reference":
        return lambda z: K.nt_xent_loss_reference(z, TAU)
    if provider == "infcl":
        from inf_cl import cal_flash_loss

        def infcl(z):  # cross-view InfoNCE (the form Inf-CL supports): view 0 rows vs view 1 columns
            q, k = z.chunk(2)
            return cal_flash_loss(q, k, scale=1 / TAU, head_dim=z.shape[1]).mean()
        return infcl
    return lambda z: K.nt_xent_loss(z, TAU, backend=provider)


def embeddings(M, D, device, dtype, seed=None):
    """(M, D) unit rows of `dtype` (a torch dtype or its name), drawn on `device`."""
    dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    g = torch.Generator(device=device).manual_seed(M if seed is None else seed)
    return F.normalize(torch.randn(M, D, device=device, generator=g), dim=1).to(dtype)


def phase_fns(provider, z0, phase):
    """(setup, step) of one phase: setup() -> args (untimed; a fresh leaf, and the loss for backward)."""
    fn = loss_fn(provider)
    if phase == "forward":
        return (lambda: (z0.detach().requires_grad_(),)), (lambda z: fn(z))
    if phase == "backward":
        def setup():
            z = z0.detach().requires_grad_()
            return fn(z), z
        return setup, (lambda loss, z: loss.backward())
    if phase == "forward+backward":
        return (lambda: (z0.detach().requires_grad_(),)), (lambda z: fn(z).backward())
    raise ValueError(f"phase must be one of forward, backward, forward+backward; got {phase!r}")


def factory(provider, M, D, device, dtype, phase="forward+backward"):
    """For bench_helpers.measure_peak_mb: (setup, step, device, warmup)."""
    setup, step = phase_fns(provider, embeddings(M, D, device, dtype), phase)
    warm_setup, warm_step = phase_fns(provider, embeddings(64, D, device, dtype), "forward+backward")
    return setup, step, device, lambda: warm_step(*warm_setup())


def main():
    provider, M, D, device, dtype = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5]
    phase = sys.argv[6] if len(sys.argv) > 6 else "forward+backward"
    print(measure_peak_mb(*factory(provider, M, D, device, dtype, phase)))


if __name__ == "__main__":
    main()
