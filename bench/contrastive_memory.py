"""Peak memory of one NT-Xent forward+backward in a fresh process (printed in MB, beyond inputs).

    python bench/contrastive_memory.py PROVIDER M D DEVICE DTYPE
CPU: growth of the peak resident set; CUDA: torch.cuda.max_memory_allocated beyond the inputs.
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


def main():
    provider, M, D, device, dtype = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5]
    dtype = getattr(torch, dtype)
    z = F.normalize(torch.randn(M, D, device=device), dim=1).to(dtype).requires_grad_()
    fn = loss_fn(provider)
    if device == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn(z).backward()
        torch.cuda.synchronize()
        extra = torch.cuda.max_memory_allocated() - base
        print(extra / 2**20)
    else:
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        fn(z).backward()
        print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1024)


if __name__ == "__main__":
    main()
