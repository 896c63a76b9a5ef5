"""Dataset indexes: UCF101, HMDB51, Kinetics-400 and a generic `path label` list.

`build_index(dataset, root, ...)` lists the videos of the dataset's splits, probes every file (frame
count, fps, size, readable) in parallel, caches the probes in `<out>.probe-cache.json` keyed by
(path, size, mtime), writes the index as JSONL (one entry per line:
{path, label, class_name, split, n_frames, fps, height, width, status}) and returns it with a
summary. `status` is "ok", "missing", "empty" or "unreadable". `load_index(path)` reads it back.
"""
from __future__ import annotations

import csv
import glob
import json
import os
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from typing import Iterable, Optional

from .reader import VideoReadError, open_video

DATASETS = ("ucf101", "hmdb51", "kinetics400", "list")


# ----------------------------------------------------------------------------- listing
class _CaseInsensitiveFiles:
    """Resolves relative paths under root, tolerating case mismatches (UCF101's lists have some)."""

    def __init__(self, root: str):
        self.root = root
        self._lower: Optional[dict] = None

    def resolve(self, rel: str) -> str:
        path = os.path.join(self.root, rel)
        if os.path.exists(path):
            return path
        if self._lower is None:
            self._lower = {}
            for d, _, files in os.walk(self.root):
                for f in files:
                    full = os.path.join(d, f)
                    self._lower[os.path.relpath(full, self.root).lower()] = full
        return self._lower.get(os.path.normpath(rel).lower(), path)


def _read_lines(path: str) -> list[str]:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"split file not found: {path}")
    with open(path) as f:
        return [ln.strip() for ln in f if ln.strip()]


def list_ucf101(root: str, splits: Optional[str] = None, split: int = 1) -> list[dict]:
    """Entries of UCF101 split `split` (train and test), labels 0-based from classInd.txt."""
    splits = splits or os.path.join(root, "ucfTrainTestlist")
    classes = {}
    for ln in _read_lines(os.path.join(splits, "classInd.txt")):
        num, name = ln.split()
        classes[name.lower()] = (int(num) - 1, name)
    files = _CaseInsensitiveFiles(root)
    out = []
    for kind in ("train", "test"):
        for ln in _read_lines(os.path.join(splits, f"{kind}list{split:02d}.txt")):
            rel = ln.split()[0]
            label, name = classes[rel.split("/")[0].lower()]
            out.append({"path": files.resolve(rel), "label": label, "class_name": name, "split": kind})
    return out


def list_hmdb51(root: str, splits: Optional[str] = None, split: int = 1) -> list[dict]:
    """Entries of HMDB51 split `split`: 1 = train, 2 = test, 0 = unused (dropped)."""
    splits = splits or os.path.join(root, "testTrainMulti_7030_splits")
    suffix = f"_test_split{split}.txt"
    paths = sorted(glob.glob(os.path.join(splits, "*" + suffix)))
    if not paths:
        raise FileNotFoundError(f"no '*{suffix}' files in {splits}")
    names = sorted(os.path.basename(p)[:-len(suffix)] for p in paths)
    out = []
    for label, name in enumerate(names):
        for ln in _read_lines(os.path.join(splits, name + suffix)):
            video, tag = ln.split()
            if tag in ("1", "2"):
                out.append({"path": os.path.join(root, name, video), "label": label, "class_name": name,
                            "split": "train" if tag == "1" else "test"})
    return out


_K400_SPLIT_DIRS = {"train": ("train",), "val": ("val", "validate", "valid"), "validate": ("val", "validate", "valid"),
                    "test": ("test",)}


def list_kinetics400(root: str, splits: str) -> list[dict]:
    """Entries from the official CSVs (a file, or every *.csv in a folder).

    Videos: ROOT/<split>/<label>/<youtube_id>_<start:06d>_<end:06d>.mp4 or flat in ROOT/<split>/.
    Labels are indices of the sorted class names; rows without a label get -1.
    """
    csvs = [splits] if os.path.isfile(splits) else sorted(glob.glob(os.path.join(splits, "*.csv")))
    if not csvs:
        raise FileNotFoundError(f"no Kinetics CSV at {splits}")
    rows = []
    for path in csvs:
        with open(path, newline="") as f:
            rows += list(csv.DictReader(f))
    names = sorted({r["label"] for r in rows if r.get("label")})
    label_of = {n: i for i, n in enumerate(names)}
    out = []
    for r in rows:
        split = r.get("split") or "train"
        split_norm = "val" if split in ("val", "validate", "valid") else split
        fname = f"{r['youtube_id']}_{int(float(r['time_start'])):06d}_{int(float(r['time_end'])):06d}.mp4"
        name = r.get("label") or ""
        candidates = []
        for d in _K400_SPLIT_DIRS.get(split, (split,)):
            if name:
                candidates += [os.path.join(root, d, name, fname), os.path.join(root, d, name.replace(" ", "_"), fname)]
            candidates.append(os.path.join(root, d, fname))
        path = next((c for c in candidates if os.path.exists(c)), candidates[0])
        out.append({"path": path, "label": label_of.get(name, -1), "class_name": name, "split": split_norm})
    return out


def list_generic(root: str, list_file: str, split: str = "train") -> list[dict]:
    """`path label` per line (MMAction2 style); relative paths are under root."""
    out = []
    for ln in _read_lines(list_file):
        parts = ln.split()
        if len(parts) < 2:
            raise ValueError(f"{list_file}: line {ln!r} is not 'path label'")
        path = parts[0] if os.path.isabs(parts[0]) else os.path.join(root, parts[0])
        out.append({"path": path, "label": int(parts[1]), "class_name": parts[1], "split": split})
    return out


# ----------------------------------------------------------------------------- probing
def probe_video(path: str, backend: str = "auto") -> dict:
    """{n_frames, fps, height, width, status} of one file; decodes its first and last frames."""
    try:
        r = open_video(path, backend=backend)
        if r.num_frames > 0:
            r.get_frames([0, r.num_frames - 1])
        return {"n_frames": r.num_frames, "fps": r.fps, "height": r.height, "width": r.width, "status": "ok"}
    except VideoReadError as e:
        return {"n_frames": 0, "fps": 0.0, "height": 0, "width": 0,
                "status": e.kind if e.kind in ("missing", "empty") else "unreadable"}


def _file_key(path: str) -> Optional[list]:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return [st.st_size, st.st_mtime_ns]


def probe_all(paths: Iterable[str], cache_path: Optional[str] = None, workers: Optional[int] = None,
              backend: str = "auto") -> tuple[dict, int]:
    """Probe each path (threads: decord and PyAV release the GIL), reusing cached probes of unchanged
    files. Returns ({path: probe}, number of files actually probed)."""
    paths = list(dict.fromkeys(paths))
    cache = {}
    if cache_path and os.path.isfile(cache_path):
        try:
            with open(cache_path) as f:
                cache = json.load(f)
        except (OSError, ValueError):
            cache = {}
    results, todo = {}, []
    for p in paths:
        key = _file_key(p)
        hit = cache.get(p)
        if key is not None and hit is not None and hit["key"] == key:
            results[p] = hit["probe"]
        elif key is None:
            results[p] = probe_video(p, backend)  # missing: cheap, never cached
        else:
            todo.append(p)
    workers = workers or min(8, os.cpu_count() or 1)
    with ThreadPoolExecutor(max(1, workers)) as pool:
        for p, res in zip(todo, pool.map(lambda q: probe_video(q, backend), todo)):
            results[p] = res
    if cache_path:
        new = {p: {"key": _file_key(p), "probe": results[p]} for p in paths if _file_key(p) is not None}
        tmp = cache_path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(new, f)
        os.replace(tmp, cache_path)
    return results, len(todo)


# ----------------------------------------------------------------------------- index
def build_index(dataset: str, root: str, out: Optional[str] = None, *, splits: Optional[str] = None,
                list_file: Optional[str] = None, split: int = 1, clip_span: int = 61,
                workers: Optional[int] = None, backend: str = "auto") -> dict:
    """List, probe and write an index. Returns {"entries": [...], "summary": {...}, "probed": int}.

    clip_span: frames one clip covers ((T - 1) * ds + 1; 61 for T = 16, ds = 4), for the summary's
    count of videos shorter than one clip (they are kept: edge frames repeat, docs/method.md §8.14).
    """
    if dataset not in DATASETS:
        raise ValueError(f"dataset must be one of {DATASETS}, got {dataset!r}")
    root = os.path.abspath(root)
    if not os.path.isdir(root):
        raise FileNotFoundError(f"dataset root is not a folder: {root}")
    if dataset == "ucf101":
        entries = list_ucf101(root, splits, split)
    elif dataset == "hmdb51":
        entries = list_hmdb51(root, splits, split)
    elif dataset == "kinetics400":
        if not splits:
            raise ValueError("kinetics400 needs --splits (a CSV file or a folder of CSVs)")
        entries = list_kinetics400(root, splits)
    else:
        if not list_file:
            raise ValueError("the generic list dataset needs --list FILE")
        entries = list_generic(root, list_file)
    cache_path = (out + ".probe-cache.json") if out else None
    probes, probed = probe_all([e["path"] for e in entries], cache_path, workers, backend)
    for e in entries:
        e.update(probes[e["path"]])
    summary = summarise(entries, clip_span)
    if out:
        os.makedirs(os.path.dirname(os.path.abspath(out)) or ".", exist_ok=True)
        tmp = out + ".tmp"
        with open(tmp, "w") as f:
            for e in entries:
                f.write(json.dumps(e) + "\n")
        os.replace(tmp, out)
    return {"entries": entries, "summary": summary, "probed": probed}


def summarise(entries: list[dict], clip_span: int = 61) -> dict:
    status = Counter(e["status"] for e in entries)
    return {
        "videos": len(entries),
        "classes": len({e["label"] for e in entries}),
        "per_split": dict(sorted(Counter(e["split"] for e in entries).items())),
        "missing": status.get("missing", 0),
        "empty": status.get("empty", 0),
        "unreadable": status.get("unreadable", 0),
        "shorter_than_clip": sum(1 for e in entries if e["status"] == "ok" and e["n_frames"] < clip_span),
        "clip_span": clip_span,
    }


def format_summary(summary: dict) -> str:
    splits = ", ".join(f"{k} {v}" for k, v in summary["per_split"].items())
    return (f"{summary['videos']} videos, {summary['classes']} classes ({splits}); "
            f"missing {summary['missing']}, empty {summary['empty']}, unreadable {summary['unreadable']}, "
            f"shorter than one clip ({summary['clip_span']} frames) {summary['shorter_than_clip']}")


def load_index(path: str, split: Optional[str] = None, only_ok: bool = False) -> list[dict]:
    """Entries of an index file (JSONL), optionally of one split and/or readable ones only."""
    with open(path) as f:
        entries = [json.loads(ln) for ln in f if ln.strip()]
    return [e for e in entries if (split is None or e["split"] == split) and (not only_ok or e["status"] == "ok")]
