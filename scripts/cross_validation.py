"""The cross-validation driver of the transfer-learning study (``configs/cross_validation.yaml``): for each
fold, train (optionally) and evaluate one Table-IV row with the bundle's own configs, then aggregate the
folds' metrics (mean +- std, as the paper's Table II)."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = ["bundle_config_dir", "run_cross_validation"]

logger = logging.getLogger(__name__)


def bundle_config_dir() -> Path:
    """The bundle's ``configs`` folder (next to the ``scripts`` package)."""
    return Path(__file__).resolve().parents[1] / "configs"


def _run_workflow(files: Sequence[str | os.PathLike], overrides: Mapping[str, Any]) -> None:
    from monai.bundle import ConfigWorkflow

    cdir = bundle_config_dir()
    files = [str(f if Path(f).is_absolute() or Path(f).exists() else cdir / f) for f in files]
    wf = ConfigWorkflow(config_file=files, workflow_type=None, **dict(overrides))
    wf.initialize()
    wf.run()
    wf.finalize()


def run_cross_validation(
    train_configs: Sequence[str] | None,
    eval_configs: Sequence[str],
    n_folds: int,
    output_dir: str | os.PathLike,
    overrides: Mapping[str, Any] | None = None,
    max_epochs: int | None = None,
    eval_splits: Sequence[str] = ("validation", "test"),
    folds: Sequence[int] | None = None,
) -> dict[str, Any]:
    """Train (optionally) and evaluate one Table-IV row on each fold, then aggregate mean ± std like Table II.

    For fold k the configs run with ``fold=k`` plus ``overrides``; evaluation runs once per split in
    ``eval_splits`` with ``eval_split`` set and writes ``<output_dir of the row>/<split>/metrics.json``
    (the evaluate overlay's ``eval_dir``). The per-fold metrics are collected into
    ``<output_dir>/cv_folds.csv`` and the mean ± std into ``<output_dir>/cv_summary.json``.

    Args:
        train_configs: config files of the training run (e.g. train.yaml + finetune.yaml), or
            None/empty for a row without training (research-only).
        eval_configs: config files of the evaluation run (the same + evaluate.yaml).
        n_folds: number of folds K.
        output_dir: where the summary goes.
        overrides: config overrides shared by all runs (bundle_root, dataset_dir, ...).
        max_epochs: overrides ``train#trainer#max_epochs`` when given.
        eval_splits: datalist splits evaluated per fold.
        folds: run only these folds (default all).
    """
    from scripts.metrics import summarise_folds

    overrides = dict(overrides or {})
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = []
    for fold in folds if folds is not None else range(n_folds):
        fold_over = {**overrides, "fold": int(fold), "n_folds": int(n_folds)}
        if train_configs:
            train_over = dict(fold_over)
            if max_epochs is not None:
                train_over["train#trainer#max_epochs"] = int(max_epochs)
            logger.info("cross-validation: training fold %d", fold)
            _run_workflow(train_configs, train_over)
        for split in eval_splits:
            eval_dir = out / f"fold-{fold}" / split
            logger.info("cross-validation: evaluating fold %d on %s", fold, split)
            _run_workflow(eval_configs, {**fold_over, "eval_split": split, "eval_dir": str(eval_dir)})
            metrics = json.loads((eval_dir / "metrics.json").read_text())
            stats_file = eval_dir / "statistics.json"
            if stats_file.is_file():
                metrics["ece"] = json.loads(stats_file.read_text()).get("ece")
            rows.append({"fold": int(fold), "split": split, **metrics})
    summary = summarise_folds(rows, out)
    logger.info("cross-validation summary written to %s", out / "cv_summary.json")
    return summary
