"""Checkpoints: one manager over named stateful parts, atomic writes, resume from the newest file that loads.

    ckpt = CheckpointManager(run_dir / "checkpoints", {"model": framework, "optimizer": opt, "rng": RNGState(g),
                             "data": loader, "trainer": counters, ...}, keep=3)
    ckpt.save(step)                 # every part's state_dict(), written atomically, the oldest pruned
    step = ckpt.resume("auto")      # newest readable checkpoint into every part; None if there is none

A part is anything with `state_dict()` and `load_state_dict(state)`. States must be plain tensors and
containers (dict, list, tuple, str, int, float, bool, None): files are read with
`torch.load(weights_only=True)`, which refuses anything else. A file is written to a temporary name in the
same folder, flushed and fsynced, renamed over its final name, and the folder is fsynced, so a crash
leaves either the complete new file or none. A file that does not load (truncated, corrupt) is reported
and the previous one is used.
"""
from __future__ import annotations

import os
import random
import re
import sys
from typing import Callable, Optional

import numpy as np
import torch

FORMAT = 1
_NAME = re.compile(r"^step-(\d+)\.pt$")


class CheckpointError(RuntimeError):
    """No usable checkpoint, or a checkpoint that does not fit the parts it is loaded into."""


def checkpoint_path(folder: str, step: int) -> str:
    return os.path.join(folder, f"step-{step:09d}.pt")


def list_checkpoints(folder: str) -> list[tuple[int, str]]:
    """(step, path) of the checkpoint files in `folder`, newest first."""
    if not os.path.isdir(folder):
        return []
    found = [(int(m.group(1)), os.path.join(folder, f)) for f in os.listdir(folder) if (m := _NAME.match(f))]
    return sorted(found, reverse=True)


def atomic_save(obj, path: str) -> None:
    """torch.save to `path` so that a crash at any point leaves the old file or the complete new one."""
    folder = os.path.dirname(os.path.abspath(path))
    tmp = os.path.join(folder, f".{os.path.basename(path)}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)  # the rename itself is durable only once the folder's entry is on disk
    finally:
        os.close(fd)


def read_checkpoint(path: str) -> dict:
    """The checkpoint's content (tensors on the CPU); raises on a file that is not a complete checkpoint."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or state.get("format") != FORMAT or not isinstance(state.get("parts"), dict):
        raise CheckpointError(f"{path} is not a dualvar checkpoint (format {FORMAT})")
    return state


def newest_readable(folder: str, log: Callable[[str], None] = print) -> Optional[tuple[str, dict]]:
    """(path, content) of the newest checkpoint in `folder` that loads; unreadable newer ones are reported
    through `log` and skipped. None when the folder has no readable checkpoint."""
    for _, path in list_checkpoints(folder):
        try:
            return path, read_checkpoint(path)
        except Exception as e:  # truncated zip, bad pickle, wrong content: all mean "this file is unusable"
            log(f"checkpoint {path} does not load ({type(e).__name__}: {str(e).splitlines()[0][:200]}); "
                "trying the previous one")
    return None


class CheckpointManager:
    """Saves and restores named stateful parts.

    folder: where `step-NNNNNNNNN.pt` files go. parts: name -> object with state_dict/load_state_dict.
    keep: newest files kept after each save. is_main: only the main process writes (all processes load).
    meta: extra plain values stored in every file (e.g. the resolved config, for export).
    """

    def __init__(self, folder: str, parts: dict, *, keep: int = 3, is_main: bool = True,
                 meta: Optional[dict] = None, log: Callable[[str], None] = print):
        for name, part in parts.items():
            if not (hasattr(part, "state_dict") and hasattr(part, "load_state_dict")):
                raise TypeError(f"checkpoint part {name!r} ({type(part).__name__}) has no state_dict/load_state_dict")
        if keep < 1:
            raise ValueError(f"keep must be >= 1, got {keep}")
        self.folder, self.parts, self.keep, self.is_main = folder, dict(parts), keep, is_main
        self.meta, self.log = dict(meta or {}), log
        if is_main:
            os.makedirs(folder, exist_ok=True)
            for f in os.listdir(folder):  # temporary files of a process killed while writing
                if f.startswith(".step-") and ".tmp-" in f:
                    os.remove(os.path.join(folder, f))

    def state(self, step: int) -> dict:
        return {"format": FORMAT, "step": int(step), "meta": self.meta,
                "parts": {name: part.state_dict() for name, part in self.parts.items()}}

    def save(self, step: int) -> Optional[str]:
        """Write every part's state as checkpoint `step` (main process only); prune to the newest `keep`."""
        state = self.state(step)  # every process builds it: parts may need collectives in state_dict later
        if not self.is_main:
            return None
        path = checkpoint_path(self.folder, step)
        atomic_save(state, path)
        for _, old in list_checkpoints(self.folder)[self.keep:]:
            os.remove(old)
        return path

    def load(self, content: dict, source: str = "checkpoint") -> int:
        """Load a checkpoint's content into the parts; returns its step. Every part must be present."""
        missing = sorted(set(self.parts) - set(content["parts"]))
        if missing:
            raise CheckpointError(f"{source} has no state for {', '.join(missing)} (it has "
                                  f"{', '.join(sorted(content['parts']))})")
        for name, part in self.parts.items():
            try:
                part.load_state_dict(content["parts"][name])
            except Exception as e:
                raise CheckpointError(f"{source}: the {name!r} state does not fit: {e}") from e
        return int(content["step"])

    def resume(self, how: str) -> Optional[int]:
        """how: "none" (returns None), "auto" (the newest checkpoint of the folder that loads, None if there
        is none) or a checkpoint path. Returns the restored step."""
        if how == "none":
            return None
        if how == "auto":
            found = newest_readable(self.folder, self.log)
            if found is None:
                return None
            path, content = found
        else:
            path, content = how, read_checkpoint(how)
        step = self.load(content, path)
        self.log(f"resumed from {path} (step {step})")
        return step


class RNGState:
    """The random generators of a process as one checkpoint part: python, numpy's legacy global state,
    torch CPU, every CUDA device, and any extra torch.Generator (e.g. the view permutations')."""

    def __init__(self, generators: Optional[dict] = None):
        self.generators = dict(generators or {})

    def state_dict(self) -> dict:
        version, internal, gauss = random.getstate()
        name, keys, pos, has_gauss, cached = np.random.get_state()
        return {
            "python": [version, list(internal), gauss],
            "numpy": {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                      "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "generators": {k: g.get_state() for k, g in self.generators.items()},
        }

    def load_state_dict(self, state: dict) -> None:
        version, internal, gauss = state["python"]
        random.setstate((version, tuple(internal), gauss))
        n = state["numpy"]
        np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                             n["cached_gaussian"]))
        torch.set_rng_state(state["torch"])
        if state["cuda"]:
            if not torch.cuda.is_available():
                print("checkpoint holds CUDA RNG states but no GPU is visible; they are not restored",
                      file=sys.stderr)
            else:
                if len(state["cuda"]) != torch.cuda.device_count():
                    print(f"checkpoint holds {len(state['cuda'])} CUDA RNG states, this process sees "
                          f"{torch.cuda.device_count()} devices; restoring the common ones", file=sys.stderr)
                for i, s in enumerate(state["cuda"][:torch.cuda.device_count()]):
                    torch.cuda.set_rng_state(s, i)
        missing = sorted(set(self.generators) - set(state["generators"]))
        if missing:
            raise KeyError(f"no saved state for generator(s) {', '.join(missing)}")
        for k, g in self.generators.items():
            g.set_state(state["generators"][k])


class PerRank:
    """A part whose state differs between processes (their random generators): the checkpoint holds every
    rank's state in rank order (gathered when it is saved: `state_dict` is a collective, which
    CheckpointManager.save calls on every process), and each rank loads its own. Resuming needs the same
    number of processes."""

    def __init__(self, part):
        self.part = part

    def state_dict(self) -> dict:
        from . import distributed
        return {"ranks": distributed.all_gather_object(self.part.state_dict())}

    def load_state_dict(self, state: dict) -> None:
        from . import distributed
        ranks = state.get("ranks") if isinstance(state, dict) else None
        if not isinstance(ranks, list) or len(ranks) != distributed.world_size():
            have = f"{len(ranks)} processes" if isinstance(ranks, list) else "one process (or another format)"
            raise ValueError(f"the checkpoint holds the states of {have}; this run has "
                             f"{distributed.world_size()}: resume with the same number of processes")
        self.part.load_state_dict(ranks[distributed.rank()])


class Counters:
    """Plain integer counters (step, epoch, ...) as a checkpoint part."""

    def __init__(self, **values: int):
        self.__dict__.update({k: int(v) for k, v in values.items()})

    def state_dict(self) -> dict:
        return dict(self.__dict__)

    def load_state_dict(self, state: dict) -> None:
        unknown = sorted(set(state) - set(self.__dict__))
        if unknown:
            raise KeyError(f"unknown counters {', '.join(unknown)}")
        self.__dict__.update({k: int(v) for k, v in state.items()})
