"""Training logs: metrics.jsonl, TensorBoard events, a tqdm bar, peak memory and the end summary.

`MetricsLogger.log(step, values)` writes one JSON line {"step": ..., name: value, ...} to
RUN_DIR/metrics.jsonl (every loss part by name), the same scalars to TensorBoard (RUN_DIR/tensorboard)
and a short view to the progress bar. Only the main process logs (is_main); on the others every call
is a no-op, so the trainer calls them unconditionally. On resume (`start_step` = the checkpoint's step),
lines of later steps written by the interrupted run are dropped from metrics.jsonl and TensorBoard purges
its events past that step, so both read as one uninterrupted run.
"""
from __future__ import annotations

import json
import math
import os
import sys

import torch

# The bar shows these (when present) in this order; the JSON line and TensorBoard get everything.
_BAR_KEYS = (("total", "loss"), ("clip_nce", "clip"), ("tc_nce", "tc"), ("sr_rank_view0", "sr0"),
             ("sr_rank_view2", "sr2"), ("sr_accuracy", "acc"), ("lr", "lr"), ("clips_per_s", "clips/s"),
             ("data_s", "data"), ("step_s", "step"))


def peak_memory_bytes(device: torch.device) -> int:
    """Peak memory of this process: the CUDA caching allocator's peak on a GPU, else the peak resident
    set size (VmHWM of /proc/self/status; 0 where that file does not exist)."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return proc_status_bytes("VmHWM")


def proc_status_bytes(field: str) -> int:
    """A memory field ("VmHWM", "VmRSS") of /proc/self/status in bytes (0 where unavailable)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def reset_peak_memory(device: torch.device) -> None:
    """Start a new peak: the CUDA allocator's, or the process's VmHWM (writing 5 to clear_refs)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def _scalar(v):
    if isinstance(v, torch.Tensor):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)  # JSON has no NaN/inf; "nan", "inf" keep the line valid
    return v


def _fmt(v) -> str:
    if isinstance(v, str):
        return v
    if isinstance(v, int) or abs(v) >= 100:
        return f"{v:.0f}"
    return f"{v:.3g}" if abs(v) < 0.01 else f"{v:.3f}"


class MetricsLogger:
    """metrics.jsonl + TensorBoard + tqdm for one run directory.

    total_steps: the bar's length (for the ETA); start_step: the step the run starts after (0, or the
    checkpoint's step on resume). tensorboard/progress switch those outputs off.
    """

    def __init__(self, run_dir: str, *, is_main: bool = True, total_steps: int = 0, start_step: int = 0,
                 tensorboard: bool = True, progress: bool = True):
        self.is_main = is_main
        self.path = os.path.join(run_dir, "metrics.jsonl")
        self._file = self._tb = self._bar = None
        if not is_main:
            return
        os.makedirs(run_dir, exist_ok=True)
        self._truncate_after(start_step)
        self._file = open(self.path, "a")
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter
            self._tb = SummaryWriter(os.path.join(run_dir, "tensorboard"), purge_step=start_step + 1)
        if progress:
            from tqdm import tqdm
            self._bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True,
                             file=sys.stderr, mininterval=1.0)

    def _truncate_after(self, step: int) -> None:
        if not os.path.exists(self.path):
            return
        keep = []
        with open(self.path) as f:
            for line in f:
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:  # a line cut short by a killed process
                    continue
                if row.get("step", 0) <= step:
                    keep.append(json.dumps(row) + "\n")
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            f.writelines(keep)
        os.replace(tmp, self.path)

    def log(self, step: int, values: dict) -> None:
        """One logged step: every value (scalars or 0-d tensors) by name."""
        if not self.is_main:
            return
        row = {"step": int(step), **{k: _scalar(v) for k, v in values.items()}}
        self._file.write(json.dumps(row) + "\n")
        self._file.flush()
        if self._tb is not None:
            for k, v in row.items():
                if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool):
                    self._tb.add_scalar(f"train/{k}", v, step)
        if self._bar is not None:
            self._bar.set_postfix_str(", ".join(f"{short} {_fmt(row[k])}" for k, short in _BAR_KEYS if k in row),
                                      refresh=False)

    def advance(self, n: int = 1) -> None:
        """The bar moves once per step, logged or not."""
        if self._bar is not None:
            self._bar.update(n)

    def message(self, text: str) -> None:
        """A line for the user (kept clear of the bar)."""
        if not self.is_main:
            return
        if self._bar is not None:
            self._bar.write(text, file=sys.stderr)
        else:
            print(text, file=sys.stderr, flush=True)

    def summary(self, values: dict) -> str:
        """Write RUN_DIR/summary.json and return a few readable lines."""
        if not self.is_main:
            return ""
        values = {k: _scalar(v) for k, v in values.items()}
        with open(os.path.join(os.path.dirname(self.path), "summary.json"), "w") as f:
            json.dump(values, f, indent=1)
        return "\n".join(f"  {k}: {_fmt(v) if isinstance(v, float) else v}" for k, v in values.items())

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        if self._tb is not None:
            self._tb.close()
        if self._file is not None:
            self._file.close()
        self._file = self._tb = self._bar = None
