"""Export a pretrained backbone: `dualvar export RUN_DIR --out model.safetensors`.

The file holds the backbone's state dict (torchvision's key names where the architecture is torchvision's,
minus the classifier: it loads strictly into e.g. `torchvision.models.video.r2plus1d_18()` whose `fc` is
`nn.Identity()`, and into `dualvar.engine.models.build_backbone(name, weights=FILE)`) plus string metadata:
backbone, frames, stride, size (crop side), mean, std (JSON lists), method (framework), mode, step,
epoch, git_revision, run name and the full config (JSON). Read it with `read_export(path)`.
"""
from __future__ import annotations

import json
import os
import subprocess
from typing import Optional

import torch

from .checkpoint import CheckpointError, newest_readable, read_checkpoint


def git_revision() -> str:
    """`git describe --always --dirty` of the source tree, or "unknown" outside a git checkout."""
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        out = subprocess.run(["git", "describe", "--always", "--dirty", "--abbrev=12"], cwd=here,
                             capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return out.stdout.strip() if out.returncode == 0 and out.stdout.strip() else "unknown"


def backbone_state(content: dict) -> tuple[dict, "object"]:
    """(backbone state dict, Config) from a checkpoint's content: the framework is rebuilt from the stored
    config, the checkpoint's model state loaded into it (strict), and `framework.backbone` (MoCo: the query
    backbone) read back."""
    from .config import from_dict
    from .frameworks import build_framework
    from .models import build_backbone
    cfg = from_dict(content["meta"]["config"])
    m = cfg.model
    framework = build_framework(m.framework, build_backbone(m.backbone), mode=m.mode, clip_dim=m.clip_dim,
                                n_series=m.n_series, series_dim=m.series_dim, momentum=m.momentum)
    framework.load_state_dict(content["parts"]["model"], strict=True)
    return framework.backbone.state_dict(), cfg


def export_backbone(run_dir: str, out: str, *, checkpoint: Optional[str] = None, log=print) -> dict:
    """Write the backbone of the newest readable checkpoint of RUN_DIR (or of `checkpoint`) to `out`
    (safetensors); returns the metadata written."""
    from safetensors.torch import save_file

    from .data import IMAGENET_MEAN, IMAGENET_STD
    if checkpoint is None:
        found = newest_readable(os.path.join(run_dir, "checkpoints"), log)
        if found is None:
            raise CheckpointError(f"no readable checkpoint in {os.path.join(run_dir, 'checkpoints')}")
        checkpoint, content = found
    else:
        content = read_checkpoint(checkpoint)
    state, cfg = backbone_state(content)
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in state.items()}
    counters = content["parts"].get("trainer", {})
    meta = {
        "format": "dualvar-backbone-1",
        "backbone": cfg.model.backbone,
        "frames": str(cfg.data.frames),
        "stride": str(cfg.data.stride),
        "size": str(cfg.data.crop),
        "mean": json.dumps(list(IMAGENET_MEAN)),
        "std": json.dumps(list(IMAGENET_STD)),
        "method": cfg.model.framework,
        "mode": cfg.model.mode,
        "step": str(content["step"]),
        "epoch": str(counters.get("epoch", "")),
        "git_revision": str(content["meta"].get("git_revision", "unknown")),
        "exported_by": git_revision(),
        "run": cfg.name,
        "checkpoint": os.path.abspath(checkpoint),
        "config": json.dumps(cfg.to_dict()),
    }
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    save_file(tensors, out, metadata=meta)
    return meta


def read_export(path: str) -> tuple[dict, dict]:
    """(state dict, metadata) of an exported file."""
    from safetensors import safe_open
    with safe_open(path, framework="pt", device="cpu") as f:
        meta = dict(f.metadata() or {})
        state = {k: f.get_tensor(k) for k in f.keys()}
    return state, meta


def load_exported(path: str) -> torch.nn.Module:
    """A backbone built from an exported file's metadata with its weights."""
    from .models import build_backbone
    _, meta = read_export(path)
    return build_backbone(meta["backbone"], weights=path)
