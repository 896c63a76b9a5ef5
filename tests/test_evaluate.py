"""Evaluation: retrieval recall@k against a float64 reference and hand-computed values, the feature cache,
unreadable videos, the linear probe, backbone loading from runs and exports, reports and the CLI."""
import argparse
import json
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dualvar.engine.data import build_index, centre_crop, eval_indices, load_index, open_video, to_views
from dualvar.engine.data.synthetic import write_synthetic_dataset
from dualvar.engine.evaluate import features as feat_mod
from dualvar.engine.evaluate import report
from dualvar.engine.evaluate.cli import COMMANDS
from dualvar.engine.evaluate.features import (FeatureCache, FeatureConfig, evaluation_sets, extract_features,
                                              load_backbone, setup_evaluation)
from dualvar.engine.evaluate.linear_probe import evaluate_linear_probe, evaluate_probe, train_linear_probe
from dualvar.engine.evaluate.retrieval import (PAPER_TABLE5, centre_and_normalise, evaluate_retrieval,
                                               nearest_neighbours, protocol_matches_paper, recall_at_k,
                                               recall_at_k_reference)
from dualvar.engine.models import build_backbone
from helpers import one_thread  # noqa: F401  (one_thread: an autouse fixture)

# tiny clips: 3 clips of 2 frames, 16 px crop of 16 x 20 frames
CLIPS = dict(frames=2, stride=2, clips=3, size=16, long=20, crop=16)


# ----------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("evalsynth"))
    write_synthetic_dataset(root, classes=3, videos_per_class=4, frames=40, height=24, width=32, seed=5, workers=1)
    index = os.path.join(root, "index.jsonl")
    build_index("ucf101", root, index, workers=1)
    return root, index


def _export_tiny(path, seed=0, **extra):
    """A safetensors file as `dualvar export` writes it (size = crop side, config as JSON)."""
    from safetensors.torch import save_file
    torch.manual_seed(seed)
    model = build_backbone("tiny")
    cfg = {"name": "t", "data": {"frames": 2, "stride": 2, "crop": 16, "size": 18, "long": 22, "holdout": 0},
           "model": {"backbone": "tiny", "framework": "simclr", "mode": "clip-sr-tc"}}
    meta = {"format": "dualvar-backbone-1", "backbone": "tiny", "frames": "2", "stride": "2", "size": "16",
            "mean": json.dumps([0.485, 0.456, 0.406]), "std": json.dumps([0.229, 0.224, 0.225]),
            "method": "simclr", "mode": "clip-sr-tc", "step": "7", "config": json.dumps(cfg), **extra}
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, path, metadata=meta)
    return model.eval()


def _hand_built():
    """Gallery / queries with known first-hit ranks, ties broken by gallery order, and a query whose class
    (3) is not in the gallery. Classes A=0, B=1, C=2."""
    gallery = torch.tensor([[1, 0, 0], [1, 0, 0], [0, 1, 0], [0, 0, 1], [0.6, 0.8, 0], [0, -1, 0]], dtype=torch.float32)
    g_lab = torch.tensor([0, 1, 0, 2, 1, 0])
    query = torch.tensor([[1, 0, 0], [1, 0, 0], [0, 0, 1], [0, 1, 0]], dtype=torch.float32)
    q_lab = torch.tensor([1, 0, 3, 2])
    # q0 (B): g0 A (1, tie first), g1 B (1)            -> rank 2
    # q1 (A): g0 A                                       -> rank 1
    # q2 (class 3): absent                               -> never
    # q3 (C): g2 A 1, g4 B .8, then ties at 0: g0 A, g1 B, g3 C -> rank 5
    return query, q_lab, gallery, g_lab, torch.tensor([2, 1, 0, 5])


# ----------------------------------------------------------------------------- retrieval maths
@pytest.mark.parametrize("chunk", [1, 2, 4, 5, 6, 1000])
def test_recall_hand_built_known_values(chunk):
    q, ql, g, gl, ranks = _hand_built()
    ks = (1, 2, 3, 4, 5, 6, 10, 50)
    res = recall_at_k(q, ql, g, gl, ks, centre=False, chunk_size=chunk)
    expect = {k: float(((ranks > 0) & (ranks <= k)).sum()) / 4 for k in ks}
    assert res["recall"] == expect
    assert expect[1] == 0.25 and expect[2] == 0.5 and expect[4] == 0.5 and expect[5] == 0.75 and expect[50] == 0.75
    assert res["ranks"].tolist() == ranks.tolist()
    assert res["recall"] == recall_at_k_reference(q, ql, g, gl, ks, centre=False)
    assert len(res["curve"]) == 50 and res["curve"][9] == 0.75


def test_nearest_neighbours_chunked_equals_unchunked_exactly():
    # small integers: every dot product is exact whatever the BLAS blocking, so the many exact ties must
    # resolve to the lower gallery index in every chunking, as a stable full sort does
    gen = torch.Generator().manual_seed(0)
    q = torch.randint(-3, 4, (40, 16), generator=gen).double()
    g = torch.randint(-3, 4, (150, 16), generator=gen).double()
    g[100] = g[3]
    g[149] = g[3]
    ref = torch.sort(q @ g.T, dim=1, descending=True, stable=True)
    for chunk in (1, 7, 64, 149, 100000):
        v, i = nearest_neighbours(q, g, 50, chunk_size=chunk)
        assert torch.equal(i, ref.indices[:, :50]), chunk
        assert torch.equal(v, ref.values[:, :50]), chunk
    # random float64 rows (no ties): identical neighbours for every chunk size
    qf = torch.randn(300, 16, generator=gen, dtype=torch.float64)
    gf = torch.randn(1000, 16, generator=gen, dtype=torch.float64)
    _, full = nearest_neighbours(qf, gf, 50, chunk_size=100000)
    for chunk in (13, 256, 999):
        assert torch.equal(nearest_neighbours(qf, gf, 50, chunk_size=chunk)[1], full), chunk
    assert nearest_neighbours(qf, gf[:5], 20)[1].shape == (300, 5)  # k larger than the gallery


@pytest.mark.parametrize("centre", [True, False])
@pytest.mark.parametrize("chunk", [1, 7, 16, 1000])
def test_recall_matches_float64_reference(centre, chunk):
    gen = torch.Generator().manual_seed(1 + chunk)
    Q, G, D = 37, 53, 8
    q = torch.randn(Q, D, generator=gen, dtype=torch.float64) + 3.0
    g = torch.randn(G, D, generator=gen, dtype=torch.float64) - 1.0
    ql = torch.randint(0, 6, (Q,), generator=gen)
    gl = torch.randint(0, 5, (G,), generator=gen)  # class 5 is absent from the gallery
    qv = torch.rand(Q, generator=gen) > 0.1
    gv = torch.rand(G, generator=gen) > 0.1
    ks = (1, 5, 10, 20, 50)
    res = recall_at_k(q, ql, g, gl, ks, centre=centre, query_valid=qv, gallery_valid=gv, chunk_size=chunk)
    ref = recall_at_k_reference(q, ql, g, gl, ks, centre=centre, query_valid=qv, gallery_valid=gv)
    assert res["recall"] == ref
    assert res["queries"] == Q and res["queries_without_feature"] == int((~qv).sum())
    assert res["gallery"] == int(gv.sum())
    # float32 features give the same answer here (no near-ties)
    res32 = recall_at_k(q.float(), ql, g.float(), gl, ks, centre=centre, query_valid=qv, gallery_valid=gv,
                        chunk_size=chunk)
    assert res32["recall"] == ref


def test_mean_centring_on_and_off():
    gen = torch.Generator().manual_seed(3)
    basis = torch.eye(4, dtype=torch.float64)
    gl = torch.arange(4).repeat(5)
    ql = torch.arange(4).repeat(2)
    g = basis[gl] * 0.5 + 0.05 * torch.randn(len(gl), 4, generator=gen, dtype=torch.float64)
    q = basis[ql] * 0.5 + 0.05 * torch.randn(len(ql), 4, generator=gen, dtype=torch.float64)
    g = g + torch.tensor([20.0, 0, 0, 0], dtype=torch.float64)  # each set has its own large offset
    q = q + torch.tensor([0, 0, 0, 20.0], dtype=torch.float64)
    on = recall_at_k(q, ql, g, gl, (1, 5), centre=True)
    off = recall_at_k(q, ql, g, gl, (1, 5), centre=False)
    assert on["recall"][1] == 1.0
    assert off["recall"][1] < 0.5
    assert on["recall"] == recall_at_k_reference(q, ql, g, gl, (1, 5), centre=True)
    assert off["recall"] == recall_at_k_reference(q, ql, g, gl, (1, 5), centre=False)
    # each set is centred on the mean of its own valid rows only
    x = torch.randn(6, 3, generator=gen, dtype=torch.float64)
    valid = torch.tensor([True, True, False, True, True, True])
    x[2] = 1e6
    out = centre_and_normalise(x, valid, centre=True)
    expect = F.normalize(x[valid] - x[valid].mean(0), dim=1)
    torch.testing.assert_close(out[valid], expect)
    assert torch.equal(out[2], torch.zeros(3, dtype=torch.float64))
    torch.testing.assert_close(centre_and_normalise(x, valid, centre=False)[valid], F.normalize(x[valid], dim=1))


def test_missing_features_count_in_the_denominator():
    q, ql, g, gl, _ = _hand_built()
    qv = torch.tensor([True, False, True, True])  # q1 was a hit at rank 1
    gv = torch.tensor([True, True, False, True, True, True])  # g2 (q3's nearest) cannot be retrieved
    res = recall_at_k(q, ql, g, gl, (1, 2, 4), centre=False, query_valid=qv, gallery_valid=gv)
    # q0: g0 A, g1 B -> rank 2; q1: miss (no feature); q2: absent class; q3: g4 B, g0 A, g1 B, g3 C -> rank 4
    assert res["recall"] == {1: 0.0, 2: 0.25, 4: 0.5}
    assert res["queries"] == 4 and res["queries_without_feature"] == 1
    assert res["gallery"] == 5 and res["gallery_without_feature"] == 1
    assert res["recall"] == recall_at_k_reference(q, ql, g, gl, (1, 2, 4), centre=False, query_valid=qv,
                                                  gallery_valid=gv)


def test_nonfinite_features_give_nan_and_bad_inputs_raise():
    q, ql, g, gl, _ = _hand_built()
    g2 = g.clone()
    g2[3, 0] = float("nan")
    res = recall_at_k(q, ql, g2, gl, (1, 5))
    assert all(v != v for v in res["recall"].values()) and res["nonfinite"] == 1
    with pytest.raises(ValueError, match="query"):
        recall_at_k(q[0], ql, g, gl)
    with pytest.raises(ValueError, match="feature size"):
        recall_at_k(q[:, :2], ql, g, gl)
    with pytest.raises(ValueError, match="gallery_labels"):
        recall_at_k(q, ql, g, gl[:3])
    with pytest.raises(ValueError, match="ks"):
        recall_at_k(q, ql, g, gl, ks=(0, 5))
    with pytest.raises(ValueError, match="chunk_size"):
        recall_at_k(q, ql, g, gl, chunk_size=0)
    with pytest.raises(ValueError, match="query_valid"):
        recall_at_k(q, ql, g, gl, query_valid=torch.ones(4))


def test_paper_row_only_when_protocol_matches():
    proto = {"dataset": "ucf101", "split": 1, "frames": 16, "stride": 4, "clips": 10, "crop": 112, "size": 128,
             "long": 171, "centre": True, "holdout": 800, "ks": [1, 5, 10, 20, 50]}
    assert protocol_matches_paper(proto)
    for key, bad in (("dataset", "synthetic"), ("split", 2), ("stride", 2), ("centre", False), ("holdout", 0)):
        assert not protocol_matches_paper({**proto, key: bad}), key
    sec = {"recall": {"1": 0.5, "5": 0.6, "10": 0.7, "20": 0.8, "50": 0.9}, "protocol": proto, "paper": PAPER_TABLE5,
           "checkpoint": {"backbone": "r2plus1d_10"}, "centre": True, "queries": 10, "gallery": 20}
    md = report.retrieval_markdown(json.loads(json.dumps(report._plain(sec))))
    assert "46.7" in md and "87.8" in md and "50.0" in md
    md = report.retrieval_markdown(json.loads(json.dumps(report._plain({**sec, "paper": None}))))
    assert "46.7" not in md and "not shown" in md


# ----------------------------------------------------------------------------- linear probe
def test_linear_probe_separable_and_counts():
    gen = torch.Generator().manual_seed(4)
    C, D = 7, 16
    centres = torch.randn(C, D, generator=gen) * 5
    ytr = torch.arange(C).repeat(12)
    yte = torch.arange(C).repeat(4)
    xtr = centres[ytr] + 0.3 * torch.randn(len(ytr), D, generator=gen)
    xte = centres[yte] + 0.3 * torch.randn(len(yte), D, generator=gen)
    probe, fit = train_linear_probe(xtr, ytr, C, weight_decay=1e-2)
    assert fit["train_accuracy"] == 1.0 and fit["iterations"] >= 1
    # the fit is the optimum of the convex objective: its float64 gradient vanishes
    W = probe.linear.weight.detach().double().requires_grad_()
    b = probe.linear.bias.detach().double().requires_grad_()
    z = (xtr.double() - probe.mean.double()) / probe.std.double()
    obj = F.cross_entropy(z @ W.T + b, ytr) + 0.5 * 1e-2 * W.pow(2).sum()
    gW, gb = torch.autograd.grad(obj, (W, b))
    assert max(gW.abs().max(), gb.abs().max()) < 1e-4
    torch.testing.assert_close(probe.mean, xtr.mean(0))
    res = evaluate_probe(probe, xte, yte, C)
    assert res["top1"] == 1.0 and res["top5"] == 1.0 and res["top5_k"] == 5
    assert torch.equal(res["confusion"], torch.diag(torch.bincount(yte, minlength=C)))
    # rows without a feature count as wrong
    valid = torch.ones(len(yte), dtype=torch.bool)
    valid[:3] = False
    res = evaluate_probe(probe, xte, yte, C, valid=valid)
    assert res["top1"] == (len(yte) - 3) / len(yte) and res["without_feature"] == 3
    assert int(res["confusion"].sum()) == len(yte) - 3
    # overlapping classes: top-5 >= top-1, top-1 below 1
    xte_hard = centres[yte] + 6 * torch.randn(len(yte), D, generator=gen)
    hard = evaluate_probe(probe, xte_hard, yte, C)
    assert hard["top5"] >= hard["top1"] and hard["top1"] < 1.0
    # fewer than 5 classes: top-C
    p3, _ = train_linear_probe(xtr[ytr < 3], ytr[ytr < 3], 3)
    r3 = evaluate_probe(p3, xte[yte < 3], yte[yte < 3], 3)
    assert r3["top5_k"] == 3 and r3["top5"] == 1.0
    with pytest.raises(ValueError, match="labels"):
        train_linear_probe(xtr, ytr, 3)


# ----------------------------------------------------------------------------- backbones
def test_load_backbone_export_run_dir_and_random(synth, tmp_path):
    path = str(tmp_path / "b.safetensors")
    ref = _export_tiny(path, seed=3)
    model, meta = load_backbone(path)
    x = torch.randn(2, 3, 2, 16, 16)
    with torch.no_grad():
        assert torch.equal(model(x), ref(x))
    assert meta["backbone"] == "tiny" and meta["crop"] == 16 and meta["size"] == 18 and meta["long"] == 22
    assert meta["model_key"].startswith("sha256:") and not model.training
    cfg = feat_mod.feature_config_from_meta(meta)
    assert (cfg.frames, cfg.crop, cfg.size, cfg.long, cfg.stride, cfg.clips) == (2, 16, 18, 22, 4, 10)
    # a run directory: the newest readable checkpoint, through the trainer's checkpoint and export code
    from dualvar.engine.checkpoint import CheckpointManager
    from dualvar.engine.config import from_dict
    from dualvar.engine.frameworks import build_framework
    config = from_dict({"data": {"dataset": "synthetic", "frames": 2, "stride": 2, "crop": 16, "size": 16,
                                 "long": 20}, "model": {"backbone": "tiny", "framework": "moco"}})
    fw = build_framework("moco", build_backbone("tiny"), mode="clip-sr-tc")
    run = str(tmp_path / "run")
    CheckpointManager(os.path.join(run, "checkpoints"), {"model": fw}, meta={"config": config.to_dict()},
                      log=lambda m: None).save(9)
    model, meta = load_backbone(run)
    with torch.no_grad():
        assert torch.equal(model(x), fw.backbone.eval()(x))
    assert meta["step"] == 9 and meta["method"] == "moco" and meta["crop"] == 16
    # random init: deterministic per seed, keyed by its weights
    a, ma = load_backbone("random:tiny:1")
    b, mb = load_backbone("random:tiny:1")
    c, mc = load_backbone("random:tiny:2")
    assert ma["model_key"] == mb["model_key"] != mc["model_key"]
    with torch.no_grad():
        assert torch.equal(a(x), b(x)) and not torch.equal(a(x), c(x))
    with pytest.raises(FileNotFoundError, match="checkpoint"):
        load_backbone(str(tmp_path / "nope"))
    with pytest.raises(ValueError, match="random"):
        load_backbone("random:tiny:x")


# ----------------------------------------------------------------------------- features and cache
def test_extract_features_match_manual_pipeline(synth):
    _, index = synth
    entries = load_index(index, "test")[:2]
    torch.manual_seed(0)
    model = build_backbone("tiny").eval()
    cfg = FeatureConfig(**CLIPS)
    fs = extract_features(model, entries, cfg, batch_size=1)
    assert fs.valid.all() and fs.decoded == 2 and fs.features.shape == (2, model.feature_dim)
    for row, e in enumerate(entries):
        r = open_video(e["path"], height=16, width=20)
        idx = eval_indices(r.num_frames, 2, 2, 3)
        frames = r.get_frames(idx.reshape(-1)).reshape(3, 2, 16, 20, 3)
        assert len({tuple(i) for i in idx.tolist()}) == 3  # three different clips
        clips = torch.from_numpy(np.stack([centre_crop(f, 16) for f in frames]))
        x = to_views({"video": clips[None]}, "cpu", augment_colour=False)[0]
        with torch.no_grad():
            expect = model(x).mean(0)
        torch.testing.assert_close(fs.features[row], expect, rtol=1e-5, atol=1e-6)
        assert fs.labels[row] == e["label"]


def test_cache_hit_avoids_decoding(synth, tmp_path, monkeypatch):
    _, index = synth
    entries = load_index(index)
    calls = []
    real = feat_mod.read_frames

    def counting(path, *a, **kw):
        calls.append(path)
        return real(path, *a, **kw)
    monkeypatch.setattr(feat_mod, "read_frames", counting)
    model = build_backbone("tiny").eval()
    cfg = FeatureConfig(**CLIPS)
    cache_dir = str(tmp_path / "cache")
    first = extract_features(model, entries, cfg, cache=FeatureCache(cache_dir, "m1", cfg), batch_size=4)
    assert len(calls) == len(entries) and first.decoded == len(entries)
    calls.clear()
    again = extract_features(model, entries[::-1], cfg, cache=FeatureCache(cache_dir, "m1", cfg))  # from disk
    assert calls == [] and again.decoded == 0
    assert torch.equal(again.features, first.features.flip(0))
    assert again.labels.tolist() == first.labels.flip(0).tolist()
    # a changed file is decoded again, alone
    st = os.stat(entries[0]["path"])
    os.utime(entries[0]["path"], ns=(st.st_atime_ns, st.st_mtime_ns + 1000))
    try:
        extract_features(model, entries, cfg, cache=FeatureCache(cache_dir, "m1", cfg))
    finally:
        os.utime(entries[0]["path"], ns=(st.st_atime_ns, st.st_mtime_ns))
    assert calls == [entries[0]["path"]]
    # another model or other clip settings: another cache
    calls.clear()
    extract_features(model, entries[:2], cfg, cache=FeatureCache(cache_dir, "m2", cfg))
    extract_features(model, entries[:2], FeatureConfig(**{**CLIPS, "clips": 2}),
                     cache=FeatureCache(cache_dir, "m1", FeatureConfig(**{**CLIPS, "clips": 2})))
    assert len(calls) == 4


def _index_with_bad_videos(synth, tmp_path):
    """A copy of the index where one test entry is a corrupt file and one is missing."""
    _, index = synth
    entries = load_index(index)
    tests = [i for i, e in enumerate(entries) if e["split"] == "test"]
    bad = tmp_path / "corrupt.avi"
    bad.write_bytes(b"not a video" * 100)
    entries[tests[0]] = {**entries[tests[0]], "path": str(bad)}
    entries[tests[1]] = {**entries[tests[1]], "path": str(tmp_path / "missing.avi"), "status": "missing"}
    out = tmp_path / "bad_index.jsonl"
    out.write_text("".join(json.dumps(e) + "\n" for e in entries))
    return str(out), len(tests)


def test_unreadable_videos_are_counted_not_dropped(synth, tmp_path):
    bad_index, n_test = _index_with_bad_videos(synth, tmp_path)
    model_path = str(tmp_path / "b.safetensors")
    _export_tiny(model_path)
    ev = setup_evaluation(model_path, bad_index, device="cpu", cache_dir=str(tmp_path / "c"), clips=3, stride=2)
    out = str(tmp_path / "out")
    sec = evaluate_retrieval(ev, out, ks=(1, 5))
    assert sec["queries"] == n_test and sec["queries_without_feature"] == 2
    assert sec["failures"]["test"]["missing"] == 1 and sec["failures"]["test"]["unreadable"] == 1
    # the same recall computed over the readable queries only, rescaled to the full denominator
    test = ev.features("test")
    train = ev.features("train")
    ok = test.valid
    sub = recall_at_k(test.features[ok], test.labels[ok], train.features, train.labels, (1, 5))
    for k in (1, 5):
        assert sec["recall"][k] == pytest.approx(sub["recall"][k] * int(ok.sum()) / n_test)
    md = open(os.path.join(out, "report.md")).read()
    assert "Unreadable videos" in md and "2 of" in md
    probe = evaluate_linear_probe(ev, out)
    assert probe["without_feature"] == 2 and probe["tested"] == n_test
    assert probe["top1"] <= (n_test - 2) / n_test


# ----------------------------------------------------------------------------- reports and CLI
def _check_png(path):
    from PIL import Image
    assert os.path.getsize(path) > 2000, path
    with open(path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    img = np.asarray(Image.open(path).convert("RGB"))
    assert img.shape[0] > 100 and img.shape[1] > 100
    assert len(np.unique(img.reshape(-1, 3), axis=0)) > 8 and img.std() > 5  # drawn, not blank
    colourful = (img.max(2).astype(int) - img.min(2)) > 60  # data in colour, not just black axes and text
    assert colourful.sum() > 200, path


def _parser():
    p = argparse.ArgumentParser(prog="dualvar")
    sub = p.add_subparsers(dest="command", required=True)
    for add in COMMANDS:
        add(sub)
    return p


def test_cli_reports_and_plots(synth, tmp_path, capsys):
    _, index = synth
    model_path = str(tmp_path / "run1" / "backbone.safetensors")
    os.makedirs(os.path.dirname(model_path))
    _export_tiny(model_path)
    run1 = os.path.dirname(model_path)
    common = ["--index", index, "--clips", "3", "--stride", "2", "--device", "cpu", "--workers", "0", "--quiet"]
    p = _parser()
    args = p.parse_args(["retrieve", "--checkpoint", model_path, "--chunk-size", "3"] + common)
    assert args.func(args) == 0
    args = p.parse_args(["linear-probe", "--checkpoint", model_path] + common)
    assert args.func(args) == 0
    run2 = str(tmp_path / "random")
    args = p.parse_args(["retrieve", "--checkpoint", "random:tiny:0", "--out", run2, "--frames", "2", "--crop", "16",
                         "--size", "16", "--long", "20", "--no-centre", "--holdout", "0"] + common)
    assert args.func(args) == 0
    out = capsys.readouterr().out
    assert "R@1" in out and "top-1" in out
    results = json.load(open(os.path.join(run1, "results.json")))
    ret, probe = results["retrieval"], results["linear_probe"]
    assert set(ret["recall"]) == {"1", "5", "10", "20", "50"} and ret["paper"] is None
    assert ret["protocol"]["dataset"] == "synthetic" and ret["clips"]["clips"] == 3
    assert ret["queries"] == 3 and ret["gallery"] == 9 and ret["sets"]["holdout"] == 0  # the run's holdout
    assert 0 <= probe["top1"] <= probe["top5"] <= 1 and probe["top5_k"] == 3
    assert ret["centre"] is True
    rand = json.load(open(os.path.join(run2, "results.json")))["retrieval"]
    assert rand["centre"] is False and rand["checkpoint"]["random_init"] and rand["clips"]["crop"] == 16
    # a pretraining run's metrics.jsonl adds the training plot to the report
    with open(os.path.join(run1, "metrics.jsonl"), "w") as f:
        for s in range(1, 30):
            f.write(json.dumps({"step": s, "lr": 0.01 * (1 - s / 30), "total": 5 / s, "clip_nce": 3 / s,
                                "tc_nce": 1 / s, "sr_rank_view0": 0.5 / s, "sr_rank_view2": 0.4 / s,
                                "sr_accuracy": 1 - 1 / s if s > 3 else "nan"}) + "\n")
        f.write('{"step": 30, "total": 0.1\n')  # cut short by a kill: skipped
    args = p.parse_args(["report", run1])
    assert args.func(args) == 0
    md = open(os.path.join(run1, "report.md")).read()
    for heading in ("## Pretraining", "## Retrieval", "## Linear probe", "training.png", "retrieval_recall.png",
                    "probe_confusion.png", "projection.png"):
        assert heading in md, heading
    pre = json.load(open(os.path.join(run1, "results.json")))["pretrain"]
    assert pre["logged_steps"] == 29 and pre["last_logged"]["step"] == 29
    for name in ("training.png", "retrieval_recall.png", "probe_confusion.png", "projection.png"):
        _check_png(os.path.join(run1, name))
    cmp_dir = str(tmp_path / "cmp")
    args = p.parse_args(["report", run1, run2, "--out", cmp_dir])
    assert args.func(args) == 0
    table = open(os.path.join(cmp_dir, "comparison.md")).read()
    assert "run1" in table and "random" in table and "R@1" in table
    r1 = f"{100 * ret['recall']['1']:.1f}"
    assert r1 in table.splitlines()[4]
    _check_png(os.path.join(cmp_dir, "comparison.png"))
    # errors name the argument, exit status 2
    args = p.parse_args(["retrieve", "--checkpoint", str(tmp_path / "none.safetensors")] + common)
    assert args.func(args) == 2
    assert "checkpoint" in capsys.readouterr().err


def test_evaluation_sets_holdout_matches_training(synth):
    from dualvar.engine.data import holdout_split
    _, index = synth
    train, test, info = evaluation_sets(index, holdout=3, holdout_seed=7)
    expect = holdout_split(load_index(index, "train", only_ok=True), 3, 7)[0]
    assert [e["path"] for e in train] == [e["path"] for e in expect]
    assert info["train_used"] == 6 and info["test_videos"] == len(test) == 3
    with pytest.raises(ValueError, match="holdout"):
        evaluation_sets(index, holdout=9)
