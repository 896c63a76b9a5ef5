"""Peak memory of one NT-Xent forward+backward in a fresh process (printed in MB, beyond inputs).

    python bench/contrastive_memory.py PROVIDER M D DEVICE DTYPE
CPU: growth of the peak resident set (VmHWM of this process's own address space: ru_maxrss would
carry the parent's peak across fork + exec and hide the growth); CUDA: torch.cuda.max_memory_allocated beyond the inputs.
Providers: reference (plain torch, full matrix), torch, cpu, triton, cuda, infcl.
"""
import resource
import sys

import torch
import torch.nn.functional as F


def loss_fn(provider):
    import dualvar.kernels as K
    if provider == "reference":
        return lambda z: K.nt_xent_loss_reference(z, 0.07)
    if provider == "infcl":
        from inf_cl import cal_flash_loss
        def infcl(z):  # cross-view InfoNCE (the form Inf-CL supports): view 0 rows vs view 1 columns
            q, k = z.chunk(2)
            return cal_flash_loss(q, k, scale=1 / 0.07, head_dim=z.shape[1]).mean()
        return infcl
    return lambda z: K.nt_xent_loss(z, 0.07, backend=provider)


def peak_rss_mb():
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024
    except (OSError, StopIteration):  # not Linux: ru_maxrss (kB on Linux, bytes on macOS)
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return rss / 2**20 if sys.platform == "darwin" else rss / 1024


def main():
    provider, M, D, device, dtype = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5]
    dtype = getattr(torch, dtype)
    z = F.normalize(torch.randn(M, D, device=device), dim=1).to(dtype).requires_grad_()
    fn = loss_fn(provider)
    # warm-up on a tiny batch: loads the extension, BLAS and thread pools before the baseline
    fn(F.normalize(torch.randn(64, D, device=device), dim=1).to(dtype).requires_grad_()).backward()
    if device == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn(z).backward()
        torch.cuda.synchronize()
        extra = torch.cuda.max_memory_allocated() - base
        print(extra / 2**20)
    else:
        base = peak_rss_mb()
        fn(z).backward()
        print(peak_rss_mb() - base)


if __name__ == "__main__":
    main()
