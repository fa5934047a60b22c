"""The bundle's configs as MONAI workflows: properties, metadata, network I/O, export, and
train -> evaluate -> infer end to end from the command line, at reduced spatial size."""

from __future__ import annotations

import csv
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from monai.bundle import ConfigParser, ConfigWorkflow, ckpt_export, verify_metadata, verify_net_in_out

from conftest import BUNDLE_ROOT, SMALL_SHAPE

CONFIGS = BUNDLE_ROOT / "configs"
META = str(CONFIGS / "metadata.json")
LOGGING = str(CONFIGS / "logging.conf")
SCHEMA = BUNDLE_ROOT.parent / "shared" / "bundle" / "meta_schema_20240725.json"
SMALL = {"spatial_size": list(SMALL_SHAPE)}


def _workflow(files, workflow_type, out_dir, dataset_dir, **override):
    return ConfigWorkflow(
        config_file=[str(CONFIGS / f) for f in files],
        meta_file=META,
        logging_file=LOGGING,
        workflow_type=workflow_type,
        bundle_root=str(out_dir),
        dataset_dir=str(dataset_dir),
        **SMALL,
        **override,
    )


def _cli(*args: str, cwd: Path = BUNDLE_ROOT) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "monai.bundle", "run", *args, "--meta_file", META, "--logging_file", LOGGING]
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, encoding="utf-8", errors="replace", timeout=900)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc


@pytest.mark.parametrize(
    "files, workflow_type",
    [(["train.yaml"], "train"), (["train.yaml", "evaluate.yaml"], "train"), (["inference.yaml"], "infer")],
)
def test_check_properties(files, workflow_type, small_demo, tmp_path):
    wf = _workflow(files, workflow_type, tmp_path, small_demo)
    wf.initialize()
    assert wf.check_properties() == []


def test_batch_of_16_is_accumulated_over_micro_batches(small_demo, tmp_path):
    wf = _workflow(["train.yaml"], "train", tmp_path, small_demo, cache_rate=0.0)
    wf.initialize()
    trainer = wf.parser.get_parsed_content("train#trainer")
    assert trainer.accumulation_steps == 16 // 4
    assert wf.parser.get_parsed_content("train#dataloader").batch_size == 4
    wf.parser["micro_batch_size"] = 16
    wf.initialize()
    assert wf.parser.get_parsed_content("train#trainer").accumulation_steps == 1


@pytest.mark.parametrize("method", ["image", "kspace"])
def test_gpu_overlay_moves_motion_to_the_batch_on_the_device(method, small_demo, tmp_path):
    """Issue 15: MotionPrepareBatch is wired into a config (configs/gpu_train.yaml): no per-sample motion in
    the workers, motion drawn per batch on the training device; one epoch runs (here on the CPU)."""
    from scripts.motion import MotionPrepareBatch

    wf = _workflow(["train.yaml", "gpu_train.yaml"], "train", tmp_path, small_demo, motion_method=method,
                   num_workers=0, batch_size=4, micro_batch_size=4, **{"train#trainer#max_epochs": 1})
    wf.initialize()
    prepare = wf.parser.get_parsed_content("train#prepare_batch")
    assert isinstance(prepare, MotionPrepareBatch) and wf.parser.get_parsed_content("train#random_transforms") == []
    trainer = wf.parser.get_parsed_content("train#trainer")
    assert trainer.prepare_batch is prepare and trainer.amp == torch.cuda.is_available()
    wf.run()
    output = trainer.state.output[0] if isinstance(trainer.state.output, list) else trainer.state.output
    assert math.isfinite(float(output["loss"]))
    assert prepare.last_params is not None and trainer.state.iteration > 0
    batch = next(iter(wf.parser.get_parsed_content("train#dataloader")))
    prepare.prob = 1.0
    images, labels = prepare(batch, torch.device("cpu"))
    assert labels.tolist() == [1] * len(labels) and not torch.equal(torch.as_tensor(images), torch.as_tensor(batch["image"]))


@pytest.mark.parametrize(
    "method, name", [("image", "RandImageMotiond"), ("kspace", "RandKSpaceMotiond"), ("torchio", "RandTorchIOMotiond")]
)
def test_motion_method_is_one_override(method, name):
    parser = ConfigParser()
    parser.read_config(str(CONFIGS / "train.yaml"))
    assert parser["motion_method"] == "image"  # our image-based simulator is the default
    parser["motion_method"] = method
    transform = parser.get_parsed_content("motion_transform")
    assert type(transform).__name__ == name
    assert transform.label_key == "label" and transform.prob == pytest.approx(0.5)


def test_run_and_training_ids_are_the_same():
    parser = ConfigParser()
    parser.read_config(str(CONFIGS / "train.yaml"))
    parser.resolve_macro_and_relative_ids()
    assert parser["training"] == parser["run"] == ["$@train::trainer.run()"]


def test_verify_metadata_offline():
    if not SCHEMA.is_file():
        pytest.skip(f"offline schema copy not found at {SCHEMA}")
    verify_metadata(meta_file=META, filepath=str(SCHEMA))
    meta = json.loads(Path(META).read_text())
    assert meta["network_data_format"]["outputs"]["pred"]["channel_def"] == {"0": "no_motion", "1": "motion"}
    assert meta["version"] in meta["changelog"]
    assert "background" not in meta["network_data_format"]["outputs"]["pred"]["channel_def"].values()


def test_verify_net_in_out_full_size():
    verify_net_in_out(net_id="network_def", meta_file=META, config_file=str(CONFIGS / "inference.yaml"), device="cpu")


@pytest.fixture(scope="module")
def trained(small_demo, tmp_path_factory) -> Path:
    """Train 2 epochs from the command line (`run training`) into a temporary bundle root."""
    out = tmp_path_factory.mktemp("bundle_out")
    _cli(
        "training",
        "--config_file", "configs/train.yaml",
        "--bundle_root", str(out),
        "--dataset_dir", str(small_demo),
        "--spatial_size", str(list(SMALL_SHAPE)),
        "--train#trainer#max_epochs", "2",
        "--batch_size", "4",
        "--micro_batch_size", "2",
        "--num_workers", "0",
    )
    # training writes runs/train/model.pt and never the shipped models/model.pt; the inference tests
    # below serve this model, as a user does who promotes their own weights to the bundle's models/
    assert not (out / "models" / "model.pt").exists()
    (out / "models").mkdir()
    shutil.copy(out / "runs" / "train" / "model.pt", out / "models" / "model.pt")
    return out


def test_training_writes_a_plain_state_dict(trained):
    model = trained / "runs" / "train" / "model.pt"
    assert model.is_file()
    state = torch.load(model, map_location="cpu", weights_only=True)
    assert "fc.6.weight" in state and state["fc.6.weight"].shape == (2, 50)
    assert any(p.name.startswith("events.out.tfevents") for p in (trained / "eval").iterdir())


def test_evaluate_writes_predictions_and_metrics(trained, small_demo):
    _cli(
        "--config_file", "['configs/train.yaml','configs/evaluate.yaml']",
        "--bundle_root", str(trained),
        "--dataset_dir", str(small_demo),
        "--spatial_size", str(list(SMALL_SHAPE)),
        "--num_workers", "0",
    )
    with (trained / "eval" / "test" / "predictions.csv").open() as f:
        rows = list(csv.DictReader(f))
    test_items = json.loads((small_demo / "datalist.json").read_text())["test"]
    assert len(rows) == len(test_items)
    assert list(rows[0]) == ["image", "participant_id", "session_id", "label", "prob_motion", "prediction"]
    for r in rows:
        p = float(r["prob_motion"])
        assert 0.0 <= p <= 1.0 and int(r["prediction"]) == int(p >= 0.5) and r["label"] in {"0", "1"}
        assert Path(r["image"]).is_file() and r["participant_id"].startswith("sub-R")
    metrics = json.loads((trained / "eval" / "test" / "metrics.json").read_text())
    assert metrics["n"] == len(rows)
    for key in ("balanced_accuracy", "sensitivity", "specificity", "roc_auc"):
        value = metrics[key]
        assert value is None or (math.isfinite(value) and 0.0 <= value <= 1.0)
    assert metrics["balanced_accuracy"] is not None


def _qc_rows(path: Path) -> list[dict]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f, delimiter="\t"))


def test_inference_on_folder_and_single_file(trained, small_demo):
    _cli(
        "--config_file", "configs/inference.yaml",
        "--bundle_root", str(trained),
        "--input", str(small_demo),
        "--spatial_size", str(list(SMALL_SHAPE)),
        "--num_workers", "0",
    )
    rows = _qc_rows(trained / "eval" / "inference" / "qc.tsv")
    assert len(rows) == len(list(small_demo.rglob("*.nii.gz")))
    assert list(rows[0])[:7] == ["participant_id", "session_id", "path", "status", "reason", "prob_motion", "decision"]
    assert all(r["status"] == "ok" and 0.0 <= float(r["prob_motion"]) <= 1.0 for r in rows)
    assert (trained / "eval" / "inference" / "qc_report.html").is_file()
    one = rows[0]["path"]
    out_one = trained / "one"
    _cli(
        "--config_file", "configs/inference.yaml",
        "--bundle_root", str(trained),
        "--output_dir", str(out_one),
        "--input", one,
        "--spatial_size", str(list(SMALL_SHAPE)),
        "--num_workers", "0",
    )
    single = _qc_rows(out_one / "qc.tsv")
    assert len(single) == 1 and single[0]["path"] == one
    assert float(single[0]["prob_motion"]) == pytest.approx(float(rows[0]["prob_motion"]), abs=1e-5)


def test_inference_reads_a_saved_threshold(trained, small_demo, tmp_path):
    from scripts.metrics import write_threshold

    path = tmp_path / "threshold.json"
    write_threshold({"threshold": 0.37, "method": "youden"}, path)
    wf = _workflow(["inference.yaml"], "infer", trained, small_demo, threshold_file=str(path))
    wf.initialize()
    assert wf.parser.get_parsed_content("threshold") == pytest.approx(0.37)
    writer = wf.parser.get_parsed_content("handlers")[-1]
    assert writer.threshold == pytest.approx(0.37)
    assert wf.parser.get_parsed_content("qc").threshold == pytest.approx(0.37)


def test_inference_postprocessing_keeps_probabilities(trained, small_demo):
    wf = _workflow(["inference.yaml"], "infer", trained, small_demo)
    wf.initialize()
    post = wf.parser.get_parsed_content("postprocessing")
    out = post({"pred": torch.tensor([0.3, -1.2])})["pred"]
    assert out.shape == (2,) and float(out.sum()) == pytest.approx(1.0)  # softmax, no argmax


def test_ckpt_export_matches_pytorch(trained, tmp_path):
    ts_path = tmp_path / "model.ts"
    ckpt_export(
        net_id="network_def",
        filepath=str(ts_path),
        ckpt_file=str(trained / "models" / "model.pt"),
        meta_file=META,
        config_file=str(CONFIGS / "inference.yaml"),
        bundle_root=str(trained),
        **SMALL,
    )
    scripted = torch.jit.load(str(ts_path))
    parser = ConfigParser()
    parser.read_config(str(CONFIGS / "inference.yaml"))
    parser.update(SMALL)
    net = parser.get_parsed_content("network_def")
    net.load_state_dict(torch.load(trained / "models" / "model.pt", map_location="cpu", weights_only=True))
    net.eval()
    x = torch.randn(2, 1, *SMALL_SHAPE)
    with torch.no_grad():
        assert torch.allclose(scripted(x), net(x), atol=1e-5)


def test_inference_reads_and_normalises_images_exactly_as_training(small_demo):
    """Issue 14: inference.yaml copies train.yaml's load and normalisation transforms with nothing binding
    them; this fails as soon as one side changes (a transform, an argument, the order) without the other."""
    train, infer = ConfigParser(), ConfigParser()
    train.read_config(str(CONFIGS / "train.yaml"))
    infer.read_config(str(CONFIGS / "inference.yaml"))
    assert train.get("normalize") == infer.get("normalize")
    assert train.get("read_transforms") == infer.get("read_transforms")
    assert train.get("validate_image") == infer.get("validate_image")
    assert train.get("train#deterministic_transforms") == infer.get("load_transforms") == "$@read_transforms + [@validate_image]"
    assert infer.get("qc_loader#read") == "$monai.transforms.Compose(@read_transforms)"  # the QC job reads the same way
    for parser in (train, infer):
        parser["spatial_size"] = list(SMALL_SHAPE)
    item = {"image": str(sorted(small_demo.rglob("*.nii.gz"))[0])}
    from monai.transforms import Compose

    ours = Compose(train.get_parsed_content("train#deterministic_transforms") + train.get_parsed_content("normalize"))
    theirs = infer.get_parsed_content("preprocessing")
    a, b = ours(dict(item))["image"], theirs(dict(item))["image"]
    assert a.shape == b.shape and torch.equal(torch.as_tensor(a), torch.as_tensor(b))


def test_qc_loader_reads_and_normalises_t1_linear_images_exactly_as_inference(small_demo):
    """Issue 14: the QC job read images its own way; its loader is now assembled from inference.yaml's own
    read and normalisation transforms, and gives the tensor the plain MONAI pipeline gives."""
    from scripts.qc import ScanLoader, default_read_transforms

    infer = ConfigParser()
    infer.read_config(str(CONFIGS / "inference.yaml"))
    infer["spatial_size"] = list(SMALL_SHAPE)
    item = {"image": str(sorted(small_demo.rglob("*.nii.gz"))[0])}
    expected = torch.as_tensor(infer.get_parsed_content("preprocessing")(dict(item))["image"])
    loader = infer.get_parsed_content("qc_loader")
    assert isinstance(loader, ScanLoader) and loader.read is not None
    out = loader(dict(item))
    assert out["status"] in ("ok", "warning") and out["input_space"] == "t1_linear", out
    assert out["image"].shape == expected.shape and torch.equal(out["image"], expected)
    from monai.transforms import Compose

    plain = Compose(default_read_transforms())(dict(item))["image"]  # the loader's default when built in Python
    config = infer.get_parsed_content("qc_loader#read")(dict(item))["image"]
    assert torch.equal(torch.as_tensor(plain), torch.as_tensor(config))
