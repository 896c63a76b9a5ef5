"""Per-call times of the cpu permute_frames backend over a long series with pauses.

    python bench/permute_series.py [calls] [pause_every] [pause_s]

Shows what a median hides: on a VM with free-page reporting (virtio-balloon), calls right after a
pause, or after other work freed memory, can land on 2 MiB blocks the host took back and re-fault
them on the host. Run with DUALVAR_HUGEPAGES=0 for 4 KiB pages, THP_MEM_ALLOC_ENABLE=1 for torch's
own huge-page switch.
"""
import sys
import time

import torch

import dualvar.kernels as K


def main(calls: int = 40, pause_every: int = 10, pause_s: float = 3.0) -> None:
    g = torch.Generator().manual_seed(0)
    video = torch.randint(0, 256, (16, 16, 224, 224, 3), dtype=torch.uint8, generator=g)
    index = torch.randint(0, 16, (16, 16), generator=g)
    times = []
    for i in range(calls):
        t0 = time.perf_counter()
        out = K.permute_frames(video, index, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), backend="cpu")
        times.append((time.perf_counter() - t0) * 1e3)
        del out
        if (i + 1) % pause_every == 0:
            time.sleep(pause_s)
    srt = sorted(times)
    print("ms per call:", " ".join(f"{t:.0f}" for t in times))
    print(f"median {srt[len(srt) // 2]:.1f} ms, mean {sum(times) / len(times):.1f} ms, "
          f"min {srt[0]:.1f} ms, max {srt[-1]:.1f} ms")


if __name__ == "__main__":
    main(*[f(a) for f, a in zip((int, int, float), sys.argv[1:])])
