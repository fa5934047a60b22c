"""Tests of scripts.handlers: output stacking, the prediction writer, resumable checkpoints, the learning curve."""

import csv
import json
from pathlib import Path

import pytest
import torch
from ignite.engine import Engine, Events
from monai.bundle import ConfigParser
from monai.data import MetaTensor

from scripts.handlers import LearningCurve, PredictionWriter, TrainingCheckpoint, stack_output
from scripts.ship import read_state


def test_stack_output_batches_decollated_items():
    items = [
        {"pred": torch.tensor([0.2, 0.8]), "label": torch.tensor(1)},
        {"pred": torch.tensor([0.9, 0.1]), "label": 0},
    ]
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
        {
            "image": MetaTensor(torch.zeros(1), meta={"filename_or_obj": n}),
            "participant_id": n[:3],
            "label": torch.tensor(l),
        }
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
    assert rows == [
        {"image": "a.nii", "participant_id": "a.n", "session_id": "", "prob_motion": "0.900000", "prediction": "0"}
    ]
    assert not (tmp_path / "metrics.json").exists()


def _trainer(net, opt, data_seed=0):
    def step(engine, batch):
        opt.zero_grad()
        loss = net(batch).pow(2).mean()
        loss.backward()
        opt.step()
        return {"loss": loss.detach()}

    return Engine(step)


def _linear_run():
    """Five batches, a seeded linear network, Adam and its trainer."""
    data = [torch.randn(2, 3) for _ in range(5)]
    torch.manual_seed(0)
    net = torch.nn.Linear(3, 1)
    opt = torch.optim.Adam(net.parameters(), lr=0.1)
    return data, net, opt, _trainer(net, opt)


def test_training_checkpoint_resumes_where_it_stopped(tmp_path):
    data, net, opt, trainer = _linear_run()
    ckpt = TrainingCheckpoint(tmp_path / "last.pt", {"trainer": trainer, "model": net, "optimizer": opt}, interval=2)
    ckpt.attach(trainer)
    trainer.run(data, max_epochs=2)
    saved = torch.load(tmp_path / "last.pt", weights_only=True)
    assert saved["trainer"]["iteration"] == 10 and not list(tmp_path.glob(".tmp-*"))
    # a new process: fresh objects, a longer run and another learning rate
    net2 = torch.nn.Linear(3, 1)
    opt2 = torch.optim.Adam(net2.parameters(), lr=0.01)
    trainer2 = _trainer(net2, opt2)
    seen = []
    trainer2.add_event_handler(Events.ITERATION_COMPLETED, lambda e: seen.append(e.state.iteration))
    ckpt2 = TrainingCheckpoint(
        tmp_path / "last.pt", {"trainer": trainer2, "model": net2, "optimizer": opt2}, interval=2
    )
    ckpt2.attach(trainer2)
    trainer2.run(data, max_epochs=3)
    assert seen == [11, 12, 13, 14, 15]  # only the third epoch ran
    assert opt2.param_groups[0]["lr"] == 0.01  # the config's learning rate wins
    assert torch.load(tmp_path / "last.pt", weights_only=True)["trainer"]["iteration"] == 15


def test_training_checkpoint_keeps_network_snapshots(tmp_path):
    data, net, opt, trainer = _linear_run()
    weights = {}
    trainer.add_event_handler(
        Events.ITERATION_COMPLETED, lambda e: weights.update({e.state.iteration: net.weight.clone()})
    )
    ckpt = TrainingCheckpoint(
        tmp_path / "last.pt", {"trainer": trainer, "model": net, "optimizer": opt}, interval=2, snapshot_interval=3
    )
    ckpt.attach(trainer)
    trainer.run(data, max_epochs=2)
    kept = sorted(p.name for p in (tmp_path / "snapshots").iterdir())
    assert kept == ["it000003.pt", "it000006.pt", "it000009.pt"]
    for it in (3, 6, 9):  # the network as it was at that iteration, loadable by scripts.averaging
        state = read_state(tmp_path / "snapshots" / f"it{it:06d}.pt")
        assert set(state) == {"weight", "bias"} and torch.equal(state["weight"], weights[it])
    with pytest.raises(ValueError, match="snapshot_key"):
        TrainingCheckpoint(tmp_path / "x.pt", {"trainer": trainer}, snapshot_interval=2)
    with pytest.raises(ValueError, match="snapshot_interval"):
        TrainingCheckpoint(tmp_path / "x.pt", {"model": net}, snapshot_interval=-1)


def test_training_checkpoint_refuses_a_checkpoint_missing_objects(tmp_path):
    net = torch.nn.Linear(3, 1)
    torch.save({"model": net.state_dict()}, tmp_path / "last.pt")
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="lacks"):
        TrainingCheckpoint(tmp_path / "last.pt", {"model": net, "optimizer": opt}).load()
    with pytest.raises(ValueError):
        TrainingCheckpoint(tmp_path / "x.pt", {}, interval=0)


def test_learning_curve_rows(tmp_path):
    net = torch.nn.Linear(3, 1)
    opt = torch.optim.SGD(net.parameters(), lr=0.01)
    trainer = _trainer(net, opt)
    curve = LearningCurve(tmp_path / "curve.tsv", every=2)
    curve.attach(trainer)
    validator = Engine(lambda e, b: None)
    curve.for_validator().attach(validator)

    @trainer.on(Events.EPOCH_COMPLETED)
    def _validate(engine):
        validator.run([0], max_epochs=1)
        validator.state.metrics = {"val_auc": 0.75}
        validator.fire_event(Events.EPOCH_COMPLETED)

    trainer.run([torch.randn(2, 3) for _ in range(4)], max_epochs=1)
    rows = [line.split("\t") for line in (tmp_path / "curve.tsv").read_text().splitlines()]
    assert rows[0] == ["time", "iteration", "epoch", "split", "name", "value"]
    train = [r for r in rows[1:] if r[3] == "train"]
    assert [r[1] for r in train] == ["2", "4"] and all(float(r[5]) >= 0 for r in train)
    assert ["4", "1", "validation", "val_auc", "0.75000"] in [r[1:] for r in rows[1:]]


def test_pretrain_overlay_passes_snapshot_interval_to_the_checkpoint():
    configs = Path(__file__).resolve().parents[1] / "configs"
    parser = ConfigParser()
    parser.read_config([str(configs / "train.yaml"), str(configs / "pretrain.yaml")])
    assert parser.get_parsed_content("checkpoint#snapshot_interval") == 0  # off by default (170 MB each)
    parser["snapshot_interval"] = 32
    assert parser["checkpoint"]["_target_"] == "scripts.handlers.TrainingCheckpoint"
    assert parser.get_parsed_content("checkpoint#snapshot_interval") == 32
