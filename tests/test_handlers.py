"""Tests of scripts.handlers: output stacking for ignite metrics and the prediction writer."""

import csv
import json

import pytest
import torch
from ignite.engine import Engine
from monai.data import MetaTensor

from scripts.handlers import PredictionWriter, stack_output


def test_stack_output_batches_decollated_items():
    items = [{"pred": torch.tensor([0.2, 0.8]), "label": torch.tensor(1)}, {"pred": torch.tensor([0.9, 0.1]), "label": 0}]
    y_pred, y = stack_output(["pred", "label"])(items)
    assert y_pred.shape == (2, 2) and y.tolist() == [1, 0] and y.dtype == torch.long
    motion, y2 = stack_output(["pred", "label"], channel=1)(items)
    assert motion.tolist() == pytest.approx([0.8, 0.1]) and torch.equal(y, y2)


def _run(writer, batches):
    def step(engine, batch):
        engine.state.batch = batch["data"]
        return batch["out"]

    engine = Engine(step)
    writer.attach(engine)
    engine.run(batches, max_epochs=1)


def _batch(names, probs, labels):
    data = [
        {"image": MetaTensor(torch.zeros(1), meta={"filename_or_obj": n}), "participant_id": n[:3], "label": torch.tensor(l)}
        for n, l in zip(names, labels)
    ]
    out = [{"prob": torch.tensor([1 - p, p])} for p in probs]
    return {"data": data, "out": out}


def test_prediction_writer_rows_and_metrics(tmp_path):
    writer = PredictionWriter(tmp_path, with_metrics=True, threshold=0.5)
    _run(writer, [_batch(["p01.nii", "p02.nii"], [0.9, 0.2], [1, 0]), _batch(["p03.nii"], [0.6], [0])])
    with (tmp_path / "predictions.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [r["image"] for r in rows] == ["p01.nii", "p02.nii", "p03.nii"]
    assert [r["prediction"] for r in rows] == ["1", "0", "1"]
    assert [r["participant_id"] for r in rows] == ["p01", "p02", "p03"]
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["sensitivity"] == 1.0 and metrics["specificity"] == 0.5 and metrics["roc_auc"] == 1.0
    assert not list(tmp_path.glob(".*tmp*"))  # no temporary file left behind


def test_prediction_writer_without_labels(tmp_path):
    writer = PredictionWriter(tmp_path, filename="p.csv", threshold=0.95)
    _run(writer, [_batch(["a.nii"], [0.9], [0])])
    with (tmp_path / "p.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert rows == [{"image": "a.nii", "participant_id": "a.n", "session_id": "", "prob_motion": "0.900000", "prediction": "0"}]
    assert not (tmp_path / "metrics.json").exists()
