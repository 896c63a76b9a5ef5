"""Evaluation of pretrained backbones: retrieval, linear probe, and run reports (docs/method.md §6).

    ev = setup_evaluation("runs/demo", index=None)          # backbone, clip settings, train/test sets, cache
    retrieval = evaluate_retrieval(ev, "runs/demo")          # recall@1..50 -> results.json, report.md, plots
    probe = evaluate_linear_probe(ev, "runs/demo")           # top-1/top-5 -> results.json, report.md, plots

    tuner = FineTuner(load_finetune_config("ucf101_after_ucf101", ["model.checkpoint=runs/demo"]), "runs/ft")
    section = tuner.fit()                                    # fine-tune, 10-clip test -> results.json, report.md

Command line: `dualvar retrieve`, `dualvar linear-probe`, `dualvar report`, `dualvar finetune`, `dualvar demo`
(engine/evaluate/cli.py).
"""
from .features import (Evaluation, FeatureCache, FeatureConfig, FeatureSet, evaluation_sets, extract_features,
                       load_backbone, setup_evaluation)
from .finetune import (FineTuner, FinetuneConfig, VideoClassifier, clip_average_softmax, load_finetune_config,
                       topk_accuracy)
from .linear_probe import LinearProbe, evaluate_linear_probe, evaluate_probe, train_linear_probe
from .report import compare_runs, update_results, write_report
from .retrieval import (DEFAULT_KS, centre_and_normalise, evaluate_retrieval, nearest_neighbours, recall_at_k,
                        recall_at_k_reference)

__all__ = [
    "Evaluation", "FeatureCache", "FeatureConfig", "FeatureSet", "evaluation_sets", "extract_features",
    "load_backbone", "setup_evaluation", "LinearProbe", "evaluate_linear_probe", "evaluate_probe",
    "train_linear_probe", "compare_runs", "update_results", "write_report", "DEFAULT_KS", "centre_and_normalise",
    "evaluate_retrieval", "nearest_neighbours", "recall_at_k", "recall_at_k_reference", "FineTuner", "FinetuneConfig",
    "VideoClassifier", "clip_average_softmax", "load_finetune_config", "topk_accuracy",
]
