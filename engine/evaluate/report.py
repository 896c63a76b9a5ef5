"""Run reports: results.json, report.md and PNG plots, for one run or several side by side.

Every evaluation merges its section ("retrieval", "linear_probe") into RUN_DIR/results.json and re-renders
RUN_DIR/report.md from all sections; a pretraining run's metrics.jsonl and summary.json add a "pretrain"
section and the training plot. Plots are drawn with matplotlib's object API (no pyplot state, Agg canvas);
without matplotlib the reports are written without plots and say so.

Plots (file names in the run directory): training.png (loss parts, ranking accuracy and learning rate over
steps), retrieval_recall.png (recall at k = 1..50), projection.png (2-D PCA of the test features, coloured by
class), probe_confusion.png (linear-probe confusion matrix). `compare_runs` writes comparison.md and
comparison.png (recall@k curves and probe accuracy of every run).
"""
from __future__ import annotations

import datetime
import json
import math
import os
from typing import Optional, Sequence

import torch

RESULTS, REPORT, METRICS, SUMMARY = "results.json", "report.md", "metrics.jsonl", "summary.json"
LOSS_KEYS = ("total", "clip_nce", "tc_nce", "sr_rank_view0", "sr_rank_view2")
ACCURACY_KEYS = ("sr_accuracy",)
PLOTS = {"training": "training.png", "recall": "retrieval_recall.png", "projection": "projection.png",
         "confusion": "probe_confusion.png", "comparison": "comparison.png"}


# ----------------------------------------------------------------------------- results.json
def _plain(v):
    """JSON-able copy: tensors to lists/numbers, tuples to lists, dict keys to strings, NaN/inf to strings."""
    if isinstance(v, torch.Tensor):
        v = v.tolist()
    if isinstance(v, dict):
        return {str(k): _plain(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    return v


def _number(v) -> float:
    """A results.json number back as float (NaN for "nan", None or anything unparsable)."""
    try:
        return float(v)
    except (TypeError, ValueError):
        return float("nan")


def read_results(run_dir: str) -> dict:
    path = os.path.join(run_dir, RESULTS)
    if not os.path.isfile(path):
        return {}
    with open(path) as f:
        return json.load(f)


def update_results(run_dir: str, section: str, payload: dict) -> dict:
    """Set results.json's `section` to payload (stamped with the time), keeping other sections; atomic."""
    os.makedirs(run_dir, exist_ok=True)
    results = read_results(run_dir)
    results[section] = _plain({**payload, "written": datetime.datetime.now().isoformat(timespec="seconds")})
    path = os.path.join(run_dir, RESULTS)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(results, f, indent=1)
    os.replace(tmp, path)
    return results


def read_metrics(path: str) -> list:
    """Rows of a metrics.jsonl (lines that do not parse are skipped; "nan"/"inf" strings become floats)."""
    rows = []
    if not os.path.isfile(path):
        return rows
    with open(path) as f:
        for line in f:
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(row, dict) and "step" in row:
                rows.append({k: (_number(v) if isinstance(v, str) and v in ("nan", "inf", "-inf") else v)
                             for k, v in row.items()})
    return rows


# ----------------------------------------------------------------------------- plots
def _figure(width: float = 6.0, height: float = 4.0):
    """A matplotlib Figure on an Agg canvas, or None when matplotlib is not installed."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        return None
    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path: str) -> str:
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, format="png")
    return path


def plot_recall_curves(curves: dict, path: str, *, marks: Sequence[int] = (1, 5, 10, 20, 50),
                       reference: Optional[dict] = None, title: str = "Retrieval recall@k") -> Optional[str]:
    """curves: {name: [recall at k = 1, 2, ...] as fractions}; reference: {name: {k: percent}} drawn as
    markers (e.g. the paper's row). Returns the path, or None without matplotlib."""
    fig = _figure()
    if fig is None:
        return None
    ax = fig.add_subplot(1, 1, 1)
    for name, curve in curves.items():
        ys = [100 * _number(v) for v in curve]
        if ys:
            line, = ax.plot(range(1, len(ys) + 1), ys, label=name, drawstyle="steps-post")
            mk = [k for k in marks if k <= len(ys)]
            ax.plot(mk, [ys[k - 1] for k in mk], "o", color=line.get_color())
    for name, row in (reference or {}).items():
        ks = sorted(int(k) for k in row)
        ax.plot(ks, [_number(row[k] if k in row else row[str(k)]) for k in ks], "k*--", label=name, markersize=8)
    ax.set_xscale("log")
    ax.set_xlabel("k (gallery videos retrieved)")
    ax.set_ylabel("recall@k (%)")
    ax.set_ylim(0, 100)
    ax.grid(True, alpha=0.3)
    ax.set_title(title)
    ax.legend(fontsize=8)
    return _save(fig, path)


def plot_confusion(confusion: torch.Tensor, class_names: Sequence[str], path: str,
                   title: str = "Linear probe: confusion (rows: true class, row-normalised)") -> Optional[str]:
    """confusion: int (C, C) counts [true, predicted]."""
    fig = _figure(7, 6)
    if fig is None:
        return None
    conf = torch.as_tensor(confusion, dtype=torch.float64)
    norm = conf / conf.sum(1, keepdim=True).clamp_min(1)
    ax = fig.add_subplot(1, 1, 1)
    im = ax.imshow(norm.numpy(), cmap="viridis", vmin=0, vmax=1, interpolation="nearest")
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    C = conf.shape[0]
    if C <= 40:
        ax.set_xticks(range(C))
        ax.set_yticks(range(C))
        ax.set_xticklabels(list(class_names)[:C], rotation=90, fontsize=6)
        ax.set_yticklabels(list(class_names)[:C], fontsize=6)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title, fontsize=9)
    return _save(fig, path)


def pca_2d(x: torch.Tensor) -> torch.Tensor:
    """(N, F) -> (N, 2): projection on the first two principal components (torch.pca_lowrank, centred)."""
    x = x.double()
    x = x - x.mean(0, keepdim=True)
    q = min(2, x.shape[0], x.shape[1])
    if q == 0:
        return torch.zeros(x.shape[0], 2, dtype=torch.float64)
    torch.manual_seed(0)  # pca_lowrank's randomised range finder
    _, _, v = torch.pca_lowrank(x, q=q, center=False, niter=6)
    out = x @ v[:, :q]
    return torch.cat([out, torch.zeros(x.shape[0], 2 - q, dtype=out.dtype)], 1) if q < 2 else out


def plot_projection(features: torch.Tensor, labels: torch.Tensor, class_names: Sequence[str], path: str,
                    title: str = "Test features, 2-D PCA") -> Optional[str]:
    """Scatter of pca_2d(features) coloured by label (features: the evaluated, valid rows)."""
    fig = _figure(7, 5.5)
    if fig is None:
        return None
    with torch.random.fork_rng(devices=[]):
        xy = pca_2d(features).numpy()
    labels = torch.as_tensor(labels).cpu()
    ax = fig.add_subplot(1, 1, 1)
    from matplotlib import colormaps
    present = sorted(set(labels.tolist()))
    qualitative = "tab10" if len(present) <= 10 else "tab20" if len(present) <= 20 else None
    cmap = colormaps[qualitative or "turbo"]
    for n, lab in enumerate(present):
        m = (labels == lab).numpy()
        name = class_names[lab] if 0 <= lab < len(class_names) else str(lab)
        ax.scatter(xy[m, 0], xy[m, 1], s=10, color=cmap(n if qualitative else n / max(len(present) - 1, 1)),
                   label=name, alpha=0.8)
    if len(present) <= 20:
        ax.legend(fontsize=6, markerscale=1.5, loc="best", ncol=2)
    ax.set_xlabel("PC 1")
    ax.set_ylabel("PC 2")
    ax.set_title(title)
    return _save(fig, path)


def plot_training(rows: Sequence[dict], path: str, title: str = "Pretraining") -> Optional[str]:
    """Loss parts, ranking accuracy and learning rate over steps, from metrics.jsonl rows."""
    if not rows:
        return None
    fig = _figure(7, 8)
    if fig is None:
        return None
    steps = [r["step"] for r in rows]

    def series(key):
        return [_number(r.get(key)) for r in rows]
    panels = [("loss parts", [k for k in LOSS_KEYS if any(k in r for r in rows)]),
              ("shuffle-rank accuracy", [k for k in ACCURACY_KEYS if any(k in r for r in rows)]),
              ("learning rate", ["lr"] if any("lr" in r for r in rows) else [])]
    panels = [p for p in panels if p[1]]
    for i, (name, keys) in enumerate(panels):
        ax = fig.add_subplot(len(panels), 1, i + 1)
        for k in keys:
            ax.plot(steps, series(k), label=k, linewidth=1.2 if k == "total" else 0.9)
        ax.set_ylabel(name)
        ax.grid(True, alpha=0.3)
        if len(keys) > 1:
            ax.legend(fontsize=7)
        if i == 0:
            ax.set_title(title)
    ax.set_xlabel("step")
    return _save(fig, path)


def plot_comparison(runs: Sequence[tuple], path: str) -> Optional[str]:
    """runs: (name, results dict). Left: recall@k curves; right: linear-probe top-1/top-5 bars."""
    fig = _figure(11, 4.5)
    if fig is None:
        return None
    ax = fig.add_subplot(1, 2, 1)
    for name, res in runs:
        curve = (res.get("retrieval") or {}).get("curve") or []
        if curve:
            ax.plot(range(1, len(curve) + 1), [100 * _number(v) for v in curve], label=name, drawstyle="steps-post")
    ax.set_xscale("log")
    ax.set_xlabel("k")
    ax.set_ylabel("recall@k (%)")
    ax.set_ylim(0, 100)
    ax.grid(True, alpha=0.3)
    ax.set_title("Retrieval")
    ax.legend(fontsize=7)
    ax2 = fig.add_subplot(1, 2, 2)
    width = 0.38
    for i, (_, res) in enumerate(runs):
        probe = res.get("linear_probe") or {}
        t1, t5 = 100 * _number(probe.get("top1")), 100 * _number(probe.get("top5"))
        ax2.bar([i - width / 2], [0 if math.isnan(t1) else t1], width, color="C0", label="top-1" if i == 0 else None)
        ax2.bar([i + width / 2], [0 if math.isnan(t5) else t5], width, color="C1", label="top-5" if i == 0 else None)
    ax2.set_xticks(range(len(runs)))
    ax2.set_xticklabels([n for n, _ in runs], rotation=20, fontsize=7, ha="right")
    ax2.set_ylim(0, 100)
    ax2.set_ylabel("accuracy (%)")
    ax2.set_title("Linear probe")
    ax2.legend(fontsize=7)
    return _save(fig, path)


# ----------------------------------------------------------------------------- markdown
def _pct(v) -> str:
    x = _number(v)
    return "n/a" if math.isnan(x) else f"{100 * x:.1f}"


def _table(header: Sequence[str], rows: Sequence[Sequence]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def retrieval_markdown(sec: dict) -> str:
    """The retrieval section: recall table (ours, and the paper's Table 5 row when the protocol matches),
    counts, failures and plots."""
    ks = [int(k) for k in sec.get("recall", {})]
    proto = sec.get("protocol", {})
    ck = sec.get("checkpoint", {})
    ours = f"this run ({ck.get('backbone', '?')}, {proto.get('dataset', '?')} split {proto.get('split', '?')})"
    rows = [[ours] + [_pct(sec["recall"][str(k)] if str(k) in sec["recall"] else sec["recall"][k]) for k in ks]]
    paper = sec.get("paper")
    if paper:
        rows.append([f"{paper['method']}, {paper['arch']}"]
                    + [f"{_number(paper['recall'].get(str(k), 'nan')):.1f}" for k in ks])
    out = ["## Retrieval", "", _table(["recall@k (%)"] + [f"k={k}" for k in ks], rows), ""]
    if paper:
        out += [f"Paper row: {paper['setting']}. Our pretraining set and budget are this run's "
                f"({ck.get('run') or ck.get('source', '?')}).", ""]
    else:
        out += ["The paper's Table 5 is not shown: this evaluation does not follow its protocol "
                "(UCF101 split 1, 10 clips of 16 frames at stride 4, 112 crop, mean-centring, 800 held out).", ""]
    clips = sec.get("clips", {})
    sets = sec.get("sets", {})
    out += [f"Protocol: queries = {sets.get('test_split', 'test')} videos ({sec.get('queries')}), gallery = "
            f"{sets.get('train_split', 'train')} videos minus {sets.get('holdout', 0)} held out "
            f"({sec.get('gallery')} with features); {clips.get('clips')} clips of {clips.get('frames')} frames at "
            f"stride {clips.get('stride')}, {clips.get('crop')} centre crop of {clips.get('size')}x{clips.get('long')}"
            f" frames, clip features averaged; mean-centring {'on' if sec.get('centre') else 'off'}, "
            "L2-normalised, cosine similarity.", ""]
    if ks and isinstance(sec.get("gallery"), int) and sec["gallery"] < max(ks):
        out += [f"The gallery has only {sec['gallery']} videos: recall at k >= {sec['gallery']} is the share of "
                "queries whose class is in the gallery.", ""]
    missing_q, missing_g = sec.get("queries_without_feature", 0), sec.get("gallery_without_feature", 0)
    if missing_q or missing_g or sets.get("train_unreadable_in_index"):
        out += [f"**Unreadable videos:** {missing_q} of {sec.get('queries')} queries had no feature and count as "
                f"misses; {missing_g} gallery videos could not be read and cannot be retrieved; "
                f"{sets.get('train_unreadable_in_index', 0)} train videos were marked unreadable in the index.", ""]
        for line in sec.get("failed_examples", [])[:5]:
            out.append(f"    {line}")
        out.append("")
    if sec.get("nonfinite"):
        out += [f"**Non-finite features** in {sec['nonfinite']} videos: recall is NaN.", ""]
    return "\n".join(out)


def probe_markdown(sec: dict) -> str:
    k = sec.get("top5_k", 5)
    ck, proto = sec.get("checkpoint", {}), sec.get("protocol", {})
    ours = f"this run ({ck.get('backbone', '?')}, {proto.get('dataset', '?')} split {proto.get('split', '?')})"
    rows = [[ours, _pct(sec.get("top1")), _pct(sec.get("top5"))]]
    out = ["## Linear probe", "", _table(["linear probe (%)", "top-1", f"top-{k}"], rows), "",
           f"Classifier: {sec.get('method')}, weight decay {sec.get('weight_decay')}, "
           f"{sec.get('iterations')} iterations (train accuracy {_pct(sec.get('train_accuracy'))}%). "
           f"Trained on {sec.get('trained_on')} train videos with features, tested on {sec.get('tested')} test "
           "videos.", ""]
    if sec.get("without_feature") or sec.get("train_without_feature"):
        out += [f"**Unreadable videos:** {sec.get('without_feature', 0)} test videos had no feature and count as "
                f"wrong; {sec.get('train_without_feature', 0)} train videos could not be read and were not used.", ""]
    if sec.get("nonfinite"):
        out += [f"**Non-finite features** in {sec['nonfinite']} videos: accuracy is NaN.", ""]
    return "\n".join(out)


def pretrain_markdown(run_dir: str, rows: Sequence[dict]) -> str:
    out = ["## Pretraining", ""]
    summary_path = os.path.join(run_dir, SUMMARY)
    if os.path.isfile(summary_path):
        with open(summary_path) as f:
            s = json.load(f)
        keep = [(k, s[k]) for k in ("steps", "epochs_done", "wall_s", "clips_per_s", "peak_mem_mb",
                                    "nonfinite_steps", "read_failures") if k in s]
        out += [_table(["summary", "value"], [[k, (f"{v:.4g}" if isinstance(v, float) else v)] for k, v in keep]), ""]
    if rows:
        last = rows[-1]
        keys = [k for k in LOSS_KEYS + ACCURACY_KEYS + ("lr",) if k in last]
        out += [f"Last logged step {last['step']}:", "",
                _table(keys, [[f"{_number(last[k]):.4g}" for k in keys]]), ""]
    return "\n".join(out)


def _images(run_dir: str, names: Sequence[str]) -> str:
    lines = [f"![{n}]({PLOTS[n]})" for n in names if os.path.isfile(os.path.join(run_dir, PLOTS[n]))]
    return "\n\n".join(lines) + ("\n" if lines else "")


def write_report(run_dir: str) -> str:
    """(Re)write RUN_DIR/report.md from results.json, metrics.jsonl and summary.json, drawing the training
    plot when metrics.jsonl exists; a pretraining run (metrics.jsonl or summary.json) also gets the
    "pretrain" section of results.json. The trainer can call this at the end of a run. Returns the path."""
    rows = read_metrics(os.path.join(run_dir, METRICS))
    summary_path = os.path.join(run_dir, SUMMARY)
    if rows or os.path.isfile(summary_path):  # a pretraining run: its own section of results.json
        summary = {}
        if os.path.isfile(summary_path):
            with open(summary_path) as f:
                summary = json.load(f)
        update_results(run_dir, "pretrain", {"summary": summary, "last_logged": rows[-1] if rows else None,
                                             "logged_steps": len(rows)})
    results = read_results(run_dir)
    name = os.path.basename(os.path.abspath(run_dir))
    parts = [f"# Report: {name}", ""]
    if rows:
        plotted = plot_training(rows, os.path.join(run_dir, PLOTS["training"]), title=f"Pretraining: {name}")
        parts += [pretrain_markdown(run_dir, rows), _images(run_dir, ["training"])]
        if plotted is None:
            parts += ["(plots skipped: matplotlib is not installed)", ""]
    if "retrieval" in results:
        parts += [retrieval_markdown(results["retrieval"]), _images(run_dir, ["recall"])]
    if "linear_probe" in results:
        parts += [probe_markdown(results["linear_probe"]), _images(run_dir, ["confusion"])]
    if os.path.isfile(os.path.join(run_dir, PLOTS["projection"])):
        parts += ["## Test features", "", _images(run_dir, ["projection"])]
    if len(parts) == 2:
        parts += ["Nothing to report yet: no metrics.jsonl and no evaluation results.", ""]
    path = os.path.join(run_dir, REPORT)
    with open(path, "w") as f:
        f.write("\n".join(parts).rstrip() + "\n")
    return path


# ----------------------------------------------------------------------------- several runs
def _run_label(run_dir: str, results: dict) -> str:
    return os.path.basename(os.path.abspath(run_dir.rstrip("/"))) or run_dir


def compare_runs(run_dirs: Sequence[str], out_dir: str) -> tuple[str, Optional[str]]:
    """One markdown table (out_dir/comparison.md) and one plot (out_dir/comparison.png) of several runs:
    backbone, method, steps, last loss, retrieval recall@k and linear-probe top-1/top-5. Each run's own
    report.md is refreshed too. Returns (markdown, plot path or None)."""
    if not run_dirs:
        raise ValueError("run_dirs: give at least one run directory")
    runs, table = [], []
    ks = (1, 5, 10, 20, 50)
    for d in run_dirs:
        if not os.path.isdir(d):
            raise FileNotFoundError(f"run directory not found: {d}")
        write_report(d)
        res = read_results(d)
        rows = read_metrics(os.path.join(d, METRICS))
        name = _run_label(d, res)
        runs.append((name, res))
        ret, probe = res.get("retrieval") or {}, res.get("linear_probe") or {}
        ck = ret.get("checkpoint") or probe.get("checkpoint") or {}
        recall = ret.get("recall", {})
        table.append([name, ck.get("backbone", "?"), " ".join(x for x in (ck.get("method"), ck.get("mode")) if x)
                      or ("random init" if ck.get("random_init") else "?"),
                      "-" if ck.get("random_init") else ck.get("step", rows[-1]["step"] if rows else "?"),
                      f"{_number(rows[-1].get('total')):.4g}" if rows and "total" in rows[-1] else "n/a"]
                     + [_pct(recall[str(k)]) if str(k) in recall else "n/a" for k in ks]
                     + [_pct(probe["top1"]) if "top1" in probe else "n/a",
                        _pct(probe["top5"]) if "top5" in probe else "n/a"])
    header = ["run", "backbone", "method", "step", "last loss"] + [f"R@{k}" for k in ks] + ["probe top-1",
                                                                                               "probe top-5"]
    md = "\n".join(["# Comparison", "", _table(header, table), ""])
    os.makedirs(out_dir, exist_ok=True)
    png = plot_comparison(runs, os.path.join(out_dir, PLOTS["comparison"]))
    if png:
        md += f"\n![comparison]({PLOTS['comparison']})\n"
    with open(os.path.join(out_dir, "comparison.md"), "w") as f:
        f.write(md)
    return md, png
