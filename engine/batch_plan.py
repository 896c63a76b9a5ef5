"""Automatic batch planning for gradient caching (`train.grad_cache_chunk=auto`).

The user names the global batch; the engine runs one probe step (forward with a graph and backward) on
`probe` clips, measures the memory it took beyond what was in use before, and picks the largest chunk that
fits the free memory less a margin:

    per_clip  = (probe peak - memory in use before the probe - fixed) / probe   (fixed: what the probe
                allocates once whatever its size, i.e. the parameter gradients; other fixed costs, such as
                workspaces, are counted per clip, so per_clip is an upper bound)
    budget    = (free memory - fixed - reserve) * (1 - margin)     (reserve: bytes still to come that the
                probe did not allocate: optimizer state before the first step, DDP's gradient buckets)
    chunk     = clamp(floor(budget / per_clip), 1, clips per process)
    expected  = memory in use + fixed + reserve + chunk * per_clip

Memory: on a GPU the caching allocator's peak (`torch.cuda.max_memory_allocated`) and the device's free memory
(`torch.cuda.mem_get_info`, plus blocks the allocator holds but does not use); on the CPU the process's peak
resident set (VmHWM of /proc/self/status, reset through /proc/self/clear_refs) and MemAvailable of
/proc/meminfo (and the cgroup's limit where one is set), shared by the processes of a node. With several
processes every rank probes and they all take the smallest chunk, so the chunks (and the collectives inside
them) line up.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Callable, Optional

import torch

from . import distributed as dist

MiB = 2 ** 20


@dataclasses.dataclass(frozen=True)
class BatchPlan:
    """The chosen chunk and the measurements behind it (bytes)."""
    chunk: int
    clips: int            # clips per process per step
    probe: int            # clips in the probe step
    per_clip: int         # measured memory per clip of a chunk (upper bound)
    in_use: int           # memory in use before the probe
    reserve: int          # fixed bytes: allocated once (gradients) or still to come (optimizer state, DDP buckets)
    free: int             # free memory for this process
    margin: float
    device: str

    @property
    def n_chunks(self) -> int:
        return -(-self.clips // self.chunk)

    @property
    def expected_peak(self) -> int:
        return self.in_use + self.reserve + self.chunk * self.per_clip

    def describe(self) -> str:
        where = "GPU" if self.device.startswith("cuda") else "host RAM"
        fits = "" if self.chunk * self.per_clip <= (self.free - self.reserve) * (1 - self.margin) else \
            " (even 1 clip exceeds the budget: expect an out-of-memory error)"
        chunks = f"{self.n_chunks} chunk{'s' if self.n_chunks != 1 else ''}"
        return (f"grad_cache_chunk=auto: the probe step of {self.probe} clips took "
                f"{self.per_clip * self.probe / MiB:.0f} MiB ({self.per_clip / MiB:.1f} MiB per clip) on "
                f"{self.device}; {self.free / MiB:.0f} MiB of {where} free, margin {self.margin:.0%} -> chunk "
                f"{self.chunk} ({chunks} of the {self.clips} clips per process), expected peak "
                f"{self.expected_peak / MiB:.0f} MiB{fits}")


# ----------------------------------------------------------------------------- memory readings
def _proc_kib(path: str, field: str) -> Optional[int]:
    try:
        with open(path) as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _cgroup_free() -> Optional[int]:
    """limit - usage of this process's cgroup (v2, or v1's memory controller), None without a limit."""
    for limit_path, usage_path in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                                   ("/sys/fs/cgroup/memory/memory.limit_in_bytes",
                                    "/sys/fs/cgroup/memory/memory.usage_in_bytes")):
        try:
            with open(limit_path) as f:
                raw = f.read().strip()
            if raw == "max" or int(raw) >= 1 << 60:
                return None
            with open(usage_path) as f:
                return int(raw) - int(f.read().strip())
        except (OSError, ValueError):
            continue
    return None


def host_free_bytes() -> int:
    """Available host memory: MemAvailable of /proc/meminfo, capped by the cgroup's remaining limit."""
    avail = _proc_kib("/proc/meminfo", "MemAvailable")
    if avail is None:
        raise RuntimeError("grad_cache_chunk=auto on the CPU reads MemAvailable from /proc/meminfo, which this "
                           "system does not have: set train.grad_cache_chunk to a number")
    cg = _cgroup_free()
    return min(avail, cg) if cg is not None else avail


def device_free_bytes(device: torch.device) -> int:
    """Free memory this process can still use on `device` (CPU: its share of the node's)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device))
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))  # processes of this node share its RAM
    return host_free_bytes() // max(local, 1)


def memory_in_use(device: torch.device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.memory_allocated(device))
    return _proc_kib("/proc/self/status", "VmRSS") or 0


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # VmHWM := VmRSS
    except OSError:
        pass


def peak(device: torch.device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return _proc_kib("/proc/self/status", "VmHWM") or 0


def _malloc_trim() -> None:
    try:
        import ctypes
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


# ----------------------------------------------------------------------------- planning
def choose_chunk(per_clip: int, free: int, reserve: int, clips: int, margin: float, min_chunk: int = 1) -> int:
    """The largest chunk in [min_chunk, clips] with chunk * per_clip <= (free - reserve) * (1 - margin)
    (min_chunk when none fits)."""
    budget = (free - reserve) * (1.0 - margin)
    return int(min(clips, max(min_chunk, budget // max(per_clip, 1))))


def plan_chunk(probe_step: Callable[[int], None], clips: int, device: torch.device, *, margin: float = 0.2,
               probe: Optional[int] = None, reserve: int = 0, fixed: int = 0, free: Optional[int] = None,
               min_chunk: int = 1) -> BatchPlan:
    """Measure `probe_step(probe)` (one forward with a graph and backward on `probe` clips, leaving the
    model as it found it) and choose the chunk; every rank takes the smallest choice.

    clips: clips per process per step. margin: fraction of the free memory left unused. probe: clips of
    the probe step (default min(clips, 4)). reserve: bytes the run will still allocate that the probe
    does not (e.g. optimizer state before the first step). fixed: bytes the probe allocates once whatever
    its size (the parameter gradients). free: override of the free-memory reading. min_chunk: the
    smallest chunk allowed (2 with train-mode BatchNorm, which needs two values per channel).
    """
    if not isinstance(clips, int) or clips < 1:
        raise ValueError(f"clips must be a positive integer, got {clips!r}")
    if not 0 <= margin < 1:
        raise ValueError(f"margin must be in [0, 1), got {margin!r}")
    device = torch.device(device)
    probe = min(clips, max(4, min_chunk)) if probe is None else min(int(probe), clips)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    else:
        _malloc_trim()  # freed heap memory back to the system, so the probe's growth shows in the RSS
    before = memory_in_use(device)
    reset_peak(device)
    probe_step(probe)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    per_clip = max(peak(device) - before - fixed, 0) // probe + 1
    free = device_free_bytes(device) if free is None else int(free)
    reserve = int(reserve) + int(fixed)
    chunk = choose_chunk(per_clip, free, reserve, clips, margin, min_chunk)
    if dist.world_size() > 1:
        chunk = int(dist.all_reduce(torch.tensor([chunk], device=device), "min").item())
    return BatchPlan(chunk=chunk, clips=clips, probe=probe, per_clip=per_clip, in_use=before, reserve=reserve,
                     free=free, margin=float(margin), device=str(device))
