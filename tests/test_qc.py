"""Batch QC (scripts/qc/, configs/inference.yaml): a malformed-input suite mixed with good scans,
out-of-memory and crashed workers, resumption, and kill-and-resume from the command line."""

from __future__ import annotations

import csv
import gzip
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
import torch
from monai.bundle import ConfigWorkflow

from conftest import BUNDLE_ROOT, SMALL_SHAPE
from ecosystem_helpers import save_small_model

from scripts.qc import QC_STATUSES, TSV_COLUMNS, QCJob, ScanLoader, collect_inputs, read_journal, read_qc_table
from scripts.qc.journal import read_jsonl

CONFIGS = BUNDLE_ROOT / "configs"


def _demo_scans(small_demo: Path) -> list[Path]:
    return sorted(small_demo.rglob("*.nii.gz"))


def _save(array: np.ndarray, affine: np.ndarray, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(array, affine), str(path))
    return path


def _dicom_with_missing_slice(folder: Path) -> Path:
    """A 40-slice DICOM series (2 mm slices) with slice 20 removed."""
    rng = np.random.default_rng(0)
    data = (rng.random((40, 72, 64)) * 500 + 100).astype(np.int16)  # (z, y, x)
    image = sitk.GetImageFromArray(data)
    image.SetSpacing((1.0, 1.0, 2.0))
    folder.mkdir(parents=True)
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    series = "1.2.826.0.1.3680043.2.1125.9.1"
    for k in range(image.GetDepth()):
        if k == 20:
            continue
        sl = image[:, :, k]
        tags = {"0008|0060": "MR", "0008|0016": "1.2.840.10008.5.1.4.1.1.4", "0008|0018": f"{series}.{k + 1}",
                "0020|000d": "1.2.826.0.1.3680043.2.1125.9.2", "0020|000e": series, "0020|0013": str(k + 1),
                "0020|0032": f"0\\0\\{2.0 * k:.1f}", "0020|0037": "1\\0\\0\\0\\1\\0", "0018|0050": "2.0",
                "0028|0030": "1.0\\1.0"}
        for key, value in tags.items():
            sl.SetMetaData(key, value)
        writer.SetFileName(str(folder / f"slice{k:03d}.dcm"))
        writer.Execute(sl)
    return folder


def _make_batch(root: Path, small_demo: Path) -> dict[str, tuple[Path, str]]:
    """Bad inputs of many kinds and good scans; returns name -> (path, expected status)."""
    rng = np.random.default_rng(0)
    scans = _demo_scans(small_demo)
    good = nib.load(scans[0])
    data, affine = np.asarray(good.dataobj, dtype=np.float32), good.affine
    b = root / "inputs"
    cases: dict[str, tuple[Path, str]] = {}
    for i, scan in enumerate(scans[:3]):
        dest = b / "good" / f"sub-G{i}" / scan.name.replace(scan.name.split("_")[0], f"sub-G{i}")
        dest.parent.mkdir(parents=True)
        shutil.copy(scan, dest)
        cases[f"good_{i}"] = (dest, "ok")
    cases["image_2d"] = (_save(rng.random((64, 64)).astype(np.float32), np.eye(4), b / "image_2d.nii.gz"), "not_3d")
    cases["4d_3_volumes"] = (_save(rng.random((43, 52, 45, 3)).astype(np.float32), affine, b / "series4d.nii.gz"), "not_3d")
    nan = data.copy()
    nan[10:12, 20, 20] = np.nan
    cases["nan_voxels"] = (_save(nan, affine, b / "nan.nii.gz"), "non_finite")
    inf = data.copy()
    inf[5, 5, 5] = np.inf
    cases["inf_voxels"] = (_save(inf, affine, b / "inf.nii.gz"), "non_finite")
    cases["all_zeros"] = (_save(np.zeros_like(data), affine, b / "zeros.nii.gz"), "empty")
    cases["constant"] = (_save(np.full_like(data, 7.0), affine, b / "constant.nii.gz"), "empty")
    blob = scans[1].read_bytes()
    (b / "truncated.nii.gz").write_bytes(blob[: len(blob) // 2])
    cases["truncated_gz"] = (b / "truncated.nii.gz", "unreadable")
    (b / "random.nii").write_bytes(rng.integers(0, 256, 5000, dtype=np.uint8).tobytes())
    cases["random_bytes_nii"] = (b / "random.nii", "unreadable")
    (b / "empty.nii.gz").write_bytes(b"")
    cases["empty_file"] = (b / "empty.nii.gz", "empty_file")
    (b / "scan.jpg").write_bytes(gzip.decompress(scans[2].read_bytes())[:2000])
    cases["wrong_extension"] = (b / "scan.jpg", "unsupported_format")
    thick = np.diag([1.0, 1.0, 8.0, 1.0])
    cases["1x1x8mm_voxels"] = (_save(rng.random((200, 200, 20)).astype(np.float32) + 1, thick, b / "thick.nii.gz"), "low_resolution")
    cases["tiny"] = (_save(rng.random((6, 6, 6)).astype(np.float32), np.eye(4), b / "tiny.nii.gz"), "too_small")
    from scipy import ndimage

    smooth = ndimage.gaussian_filter(rng.random(data.shape), 3).astype(np.float32) * 1000
    cases["non_brain"] = (_save(smooth, affine, b / "nonbrain.nii.gz"), "not_brain")
    from scripts.preprocessing.quality import template_on_grid

    _, mask, _ = template_on_grid(SMALL_SHAPE)
    cases["skull_stripped"] = (_save(data * mask, affine, b / "stripped.nii.gz"), "warning")
    flip = affine.copy()  # the same world image stored left-right flipped (radiological, LAS)
    flip[:3, 0] = -affine[:3, 0]
    flip[:3, 3] = affine[:3, 3] + affine[:3, 0] * (data.shape[0] - 1)
    cases["lr_flipped_affine"] = (_save(data[::-1].copy(), flip, b / "flipped.nii.gz"), "ok")
    cases["dicom_missing_slice"] = (_dicom_with_missing_slice(b / "dicom_gap"), "dicom_missing_slice")
    (b / "empty_folder").mkdir()
    cases["empty_folder"] = (b / "empty_folder", "empty_folder")
    cases["not_found"] = (b / "does_not_exist.nii.gz", "not_found")
    # one raw scan (not in t1-linear space): goes through T1Linear (~10 s)
    from scripts.preprocessing.synthetic import make_scan

    raw = make_scan(seed=3, spacing=(1.2, 1.2, 1.2), max_rotation_deg=5.0, max_translation_mm=5.0, max_scaling=0.03)
    (b / "raw").mkdir()
    sitk.WriteImage(raw.image, str(b / "raw" / "sub-RAW_T1w.nii.gz"))
    cases["raw_scan"] = (b / "raw" / "sub-RAW_T1w.nii.gz", "ok")
    return cases


def _workflow(bundle: Path, **override) -> ConfigWorkflow:
    wf = ConfigWorkflow(
        config_file=str(CONFIGS / "inference.yaml"), meta_file=str(CONFIGS / "metadata.json"),
        logging_file=str(CONFIGS / "logging.conf"), workflow_type="infer", bundle_root=str(bundle),
        spatial_size=list(SMALL_SHAPE), progress=False, **override,
    )
    wf.initialize()
    return wf


@pytest.fixture(scope="module")
def batch(small_demo, tmp_path_factory):
    root = tmp_path_factory.mktemp("qc_batch")
    save_small_model(root / "models" / "model.pt", seed=5)
    cases = _make_batch(root, small_demo)
    listing = root / "inputs.tsv"
    with listing.open("w", newline="") as f:
        writer = csv.writer(f, delimiter="\t")
        writer.writerow(["path"])
        writer.writerows([[str(p)] for p, _ in cases.values()])
    out = root / "out"
    wf = _workflow(root, input=str(listing), output_dir=str(out), num_workers=2)
    assert wf.check_properties() == []
    wf.run()
    wf.finalize()
    return {"root": root, "cases": cases, "out": out, "listing": listing}


def test_malformed_inputs_each_get_exactly_one_row_with_the_right_status(batch):
    rows = read_qc_table(batch["out"] / "qc.tsv")
    assert list(rows[0]) == list(TSV_COLUMNS)
    by_path = {r["path"]: r for r in rows}
    assert len(rows) == len(by_path) == len(batch["cases"])
    kinds_of_bad = {e for _, e in batch["cases"].values() if e not in ("ok",)}
    assert len([n for n, (_, e) in batch["cases"].items() if not n.startswith("good")]) >= 15 and len(kinds_of_bad) >= 12
    got = {name: by_path[os.path.abspath(p)]["status"] for name, (p, _) in batch["cases"].items()}
    assert got == {name: expected for name, (_, expected) in batch["cases"].items()}, {
        n: by_path[os.path.abspath(p)]["reason"] for n, (p, e) in batch["cases"].items() if got[n] != e
    }
    for r in rows:
        assert r["status"] in QC_STATUSES
        if r["status"] in ("ok", "warning"):
            p = float(r["prob_motion"])
            assert 0.0 <= p <= 1.0 and r["decision"] == ("motion" if p >= 0.5 else "no_motion")
            assert len(r["model_sha256"]) == 64 and r["bundle_version"] not in ("", "unknown")
        else:
            assert r["prob_motion"] == "" and r["decision"] == "" and r["reason"]
    assert by_path[os.path.abspath(batch["cases"]["raw_scan"][0])]["input_space"] == "raw"
    assert by_path[os.path.abspath(batch["cases"]["good_0"][0])]["input_space"] == "t1_linear"
    assert "skull-stripped" in by_path[os.path.abspath(batch["cases"]["skull_stripped"][0])]["reason"]
    assert "gap" in by_path[os.path.abspath(batch["cases"]["dicom_missing_slice"][0])]["reason"]


def test_flipped_affine_scores_like_the_original_and_matches_the_config_preprocessing(batch, small_demo):
    rows = {r["path"]: r for r in read_qc_table(batch["out"] / "qc.tsv")}
    original = float(rows[os.path.abspath(batch["cases"]["good_0"][0])]["prob_motion"])
    flipped = float(rows[os.path.abspath(batch["cases"]["lr_flipped_affine"][0])]["prob_motion"])
    assert flipped == pytest.approx(original, abs=1e-5)
    # the QC job scores exactly like the MONAI workflow's preprocessing + network (what MONAI Label uses)
    wf = _workflow(batch["root"])
    net = wf.parser.get_parsed_content("network_def")
    net.load_state_dict(torch.load(batch["root"] / "models" / "model.pt", weights_only=True))
    image = wf.parser.get_parsed_content("preprocessing")({"image": str(batch["cases"]["good_0"][0])})["image"]
    with torch.no_grad():
        expected = torch.softmax(net.eval()(image[None].as_tensor()), dim=1)[0, 1].item()
    assert original == pytest.approx(expected, abs=1e-5)


def test_rerun_skips_recorded_scans_and_strict_exits_3(batch):
    table = batch["out"] / "qc.tsv"
    before = table.read_text()
    journal = len(read_journal(batch["out"] / ".qc"))
    wf = _workflow(batch["root"], input=str(batch["listing"]), output_dir=str(batch["out"]), num_workers=0, strict=True)
    with pytest.raises(SystemExit) as info:
        wf.run()
    assert info.value.code == 3
    assert table.read_text() == before and len(read_journal(batch["out"] / ".qc")) == journal


def test_report_has_a_card_per_scored_scan(batch):
    html = (batch["out"] / "qc_report.html").read_text()
    scored = [r for r in read_qc_table(batch["out"] / "qc.tsv") if r["status"] in ("ok", "warning")]
    assert html.count("data:image/jpeg;base64") == 1  # in the script only: pictures are inserted page by page
    assert html.count('"img":"/9j/') == len(scored)  # one embedded JPEG per scored scan
    assert "dicom_missing_slice" in html and "<svg" in html and "http" not in html.split("<body")[1].replace(
        'xmlns="http://www.w3.org/2000/svg"', "")


def test_collect_inputs_from_folder_bids_and_lists(tmp_path, small_demo):
    scans = _demo_scans(small_demo)
    bids = tmp_path / "bids"
    for sub in ("01", "02"):
        dest = bids / f"sub-{sub}" / "ses-A" / "anat" / f"sub-{sub}_ses-A_T1w.nii.gz"
        dest.parent.mkdir(parents=True)
        shutil.copy(scans[0], dest)
        (dest.parent / f"sub-{sub}_ses-A_T1w.json").write_text("{}")
        shutil.copy(scans[1], dest.parent / f"sub-{sub}_ses-A_FLAIR.nii.gz")
    (bids / "dataset_description.json").write_text('{"Name": "x", "BIDSVersion": "1.8.0"}')
    items = collect_inputs(bids)
    assert [(i["participant_id"], i["session_id"]) for i in items] == [("sub-01", "ses-A"), ("sub-02", "ses-A")]
    folder = tmp_path / "plain"
    _dicom_with_missing_slice(folder / "a" / "dicom")
    shutil.copy(scans[0], folder / "b.nii.gz")
    (folder / "notes.txt").write_text("not a scan")
    paths = [Path(i["image"]).relative_to(folder).as_posix() for i in collect_inputs(folder)]
    assert paths == ["b.nii.gz", "a/dicom"]
    listing = tmp_path / "list.csv"
    listing.write_text(f"image\n{scans[0]}\n{scans[0]}\nmissing.nii.gz\n")
    items = collect_inputs(listing)
    assert [Path(i["image"]).name for i in items] == [scans[0].name, "missing.nii.gz"]  # duplicates once
    with pytest.raises(FileNotFoundError):
        collect_inputs(tmp_path / "nowhere")


class _OOMOnce(torch.nn.Module):
    """Raises out-of-memory on any batch holding ``target``, whatever its size."""

    def __init__(self, net: torch.nn.Module, target: torch.Tensor) -> None:
        super().__init__()
        self.net, self.target = net, target

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if any(torch.allclose(xi, self.target, atol=1e-4) for xi in x):
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        return self.net(x)


class _KillOn(ScanLoader):
    """A loader whose process is killed (like by the OOM killer) on one scan."""

    victim = ""

    def load(self, path):
        if path == self.victim:
            os.kill(os.getpid(), signal.SIGKILL)
        return super().load(path)


def test_out_of_memory_and_a_killed_worker_become_rows(small_demo, tmp_path):
    from monai.transforms import Compose, NormalizeIntensityd

    scans = _demo_scans(small_demo)[:5]
    norm = Compose([NormalizeIntensityd(keys="image")])
    target = ScanLoader(SMALL_SHAPE, norm)({"image": str(scans[1])})["image"]
    net = save_small_model(tmp_path / "m.pt", seed=1)
    loader = _KillOn(SMALL_SHAPE, norm)
    _KillOn.victim = str(scans[3])
    job = QCJob(input=[str(s) for s in scans], network=_OOMOnce(net, target), output_dir=tmp_path / "out", loader=loader,
                batch_size=2, num_workers=1, saliency="none", thumbnails=False, report=False, progress=False)
    job.run()
    rows = {Path(r["path"]).name: r for r in read_qc_table(tmp_path / "out" / "qc.tsv")}
    assert len(rows) == 5
    assert rows[scans[1].name]["status"] == "out_of_memory" and "20.00 GiB" in rows[scans[1].name]["reason"]
    assert rows[scans[3].name]["status"] == "worker_crashed"
    assert [rows[s.name]["status"] for s in (scans[0], scans[2], scans[4])] == ["ok"] * 3
    assert rows[scans[0].name]["model_sha256"] == "untrained"


def _cli_job(small_demo: Path, tmp_path: Path, copies: int, workers: int) -> tuple[list[str], Path, Path]:
    """A small model in ``tmp_path/models``, ``copies`` copies of the demo scans, and the QC command line
    over them: ``(command, inputs folder, output folder)``."""
    save_small_model(tmp_path / "models" / "model.pt", seed=2)
    inputs = tmp_path / "scans"
    inputs.mkdir()
    for k in range(copies):
        for scan in _demo_scans(small_demo):
            shutil.copy(scan, inputs / f"copy{k}_{scan.name}")
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "monai.bundle", "run", "--config_file", str(CONFIGS / "inference.yaml"),
           "--meta_file", str(CONFIGS / "metadata.json"), "--bundle_root", str(tmp_path), "--input", str(inputs),
           "--output_dir", str(out), "--spatial_size", str(list(SMALL_SHAPE)), "--num_workers", str(workers)]
    return cmd, inputs, out


def test_kill_and_resume_from_the_command_line(small_demo, tmp_path):
    """SIGKILL the whole job (main process and workers) mid-run, restart: every input exactly once."""
    cmd, inputs, out = _cli_job(small_demo, tmp_path, copies=2, workers=1)
    n = len(list(inputs.iterdir()))
    log = (tmp_path / "first.log").open("wb")
    proc = subprocess.Popen(cmd, cwd=BUNDLE_ROOT, stdout=log, stderr=log, start_new_session=True)
    journal = out / ".qc" / "journal-rank0.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if journal.is_file() and len(journal.read_text().splitlines()) >= 3:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the job ended before it could be killed: " + (tmp_path / "first.log").read_text("utf-8", "replace")[-2000:]
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    log.close()
    first = len(read_journal(out / ".qc"))
    assert 3 <= first < n
    assert not (out / "qc.tsv").is_file() or len(read_qc_table(out / "qc.tsv")) < n
    done = subprocess.run(cmd, cwd=BUNDLE_ROOT, capture_output=True, text=True, encoding="utf-8", errors="replace", timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = read_qc_table(out / "qc.tsv")
    assert sorted(r["path"] for r in rows) == sorted(str(p) for p in inputs.iterdir())
    assert all(r["status"] == "ok" for r in rows)
    assert len(read_jsonl(out / ".qc" / "journal-rank0.jsonl")) == n  # recorded scans were not redone


def test_rerun_with_a_new_threshold_only_redoes_decisions(batch, tmp_path):
    out = tmp_path / "copy"
    shutil.copytree(batch["out"], out)
    wf = _workflow(batch["root"], input=str(batch["listing"]), output_dir=str(out), num_workers=0, default_threshold=0.0)
    wf.run()
    rows = read_qc_table(out / "qc.tsv")
    assert len(read_journal(out / ".qc")) == len(rows) == len(batch["cases"])  # nothing re-scored
    assert {r["decision"] for r in rows if r["prob_motion"]} == {"motion"} and {r["threshold"] for r in rows} == {"0"}


def test_cut_graph_gradcam_equals_monai_gradcam(tmp_path):
    from monai.visualize import GradCAM

    from scripts.networks import Conv5FC3

    net = save_small_model(tmp_path / "a.pt", seed=11)
    reference_net = Conv5FC3(input_size=SMALL_SHAPE)
    reference_net.load_state_dict(net.state_dict())
    torch.manual_seed(0)
    x = torch.randn(1, *SMALL_SHAPE)
    job = QCJob(input=[], network=net, output_dir=tmp_path / "o", loader=ScanLoader(SMALL_SHAPE), progress=False)
    results = [job._gradcam(x * s) for s in (1.0, -1.0)]
    for (prob, fast), s in zip(results, (1.0, -1.0)):
        expected = GradCAM(nn_module=reference_net.eval(), target_layers="convolutions.14")(x[None] * s, class_idx=1)
        np.testing.assert_allclose(fast, expected[0, 0].detach().numpy(), atol=1e-5)
        with torch.no_grad():
            assert prob == pytest.approx(torch.softmax(reference_net(x[None] * s), 1)[0, 1].item(), abs=1e-6)
    assert max(float(np.max(m)) for _, m in results) > 0  # a real map somewhere, not all zeros


def test_channels_last_scoring_equals_contiguous_scoring_with_gradcam(tmp_path):
    """The CPU fast path (channels-last network and inputs) changes memory order, not results."""
    net = save_small_model(tmp_path / "a.pt", seed=12)
    plain_net = save_small_model(tmp_path / "b.pt", seed=12)
    jobs = {}
    for fast, network in ((True, net), (False, plain_net)):
        jobs[fast] = QCJob(input=[], network=network, output_dir=tmp_path / f"o{fast}", loader=ScanLoader(SMALL_SHAPE),
                           progress=False, channels_last=fast, tune_allocator=False)
        jobs[fast]._load_weights()
    assert net.convolutions[4].weight.is_contiguous(memory_format=torch.channels_last_3d)
    assert plain_net.convolutions[4].weight.is_contiguous()
    torch.manual_seed(0)
    x = torch.randn(2, 1, *SMALL_SHAPE)
    np.testing.assert_allclose(jobs[True]._forward(x).numpy(), jobs[False]._forward(x).numpy(), atol=1e-5)
    (prob_fast, map_fast), (prob_plain, map_plain) = jobs[True]._gradcam(x[0]), jobs[False]._gradcam(x[0])
    assert prob_fast == pytest.approx(prob_plain, abs=1e-5)
    assert float(np.max(map_plain)) > 0
    np.testing.assert_allclose(map_fast, map_plain, atol=1e-4)


@pytest.mark.parametrize("enable", [True, False])
def test_allocator_is_tuned_once_per_run(small_demo, tmp_path, monkeypatch, enable):
    from scripts import performance

    calls = []
    monkeypatch.setattr(performance, "tune_allocator", lambda enable=True: calls.append(enable) or False)
    net = save_small_model(tmp_path / "m.pt", seed=3)
    job = QCJob(input=[str(s) for s in _demo_scans(small_demo)[:3]], network=net, output_dir=tmp_path / "out",
                loader=ScanLoader(SMALL_SHAPE), num_workers=0, saliency="none", thumbnails=False, report=False,
                progress=False, tune_allocator=enable)
    assert job.run() == {"ok": 3}
    assert calls == [enable]


class _NaNNet(torch.nn.Module):
    """A broken network: NaN logits (issue 14, defect 2)."""

    def __init__(self, net: torch.nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x) * float("nan")


@pytest.mark.parametrize("saliency", ["none", "gradcam"])
def test_non_finite_network_output_is_an_error_not_no_motion(small_demo, tmp_path, saliency):
    net = _NaNNet(save_small_model(tmp_path / "m.pt", seed=3))
    job = QCJob(
        input=[str(s) for s in _demo_scans(small_demo)[:2]],
        network=net,
        output_dir=tmp_path / "out",
        loader=ScanLoader(SMALL_SHAPE),
        num_workers=0,
        saliency=saliency,
        saliency_layer="net.convolutions.14",
        thumbnails=saliency == "gradcam",
        report=True,
        progress=False,
    )
    assert job.run() == {"inference_failed": 2}
    for row in read_qc_table(tmp_path / "out" / "qc.tsv"):
        assert row["decision"] == "" and row["prob_motion"] == "" and "nan" in row["reason"]
    assert "NaN" not in (tmp_path / "out" / "qc_report.html").read_text()


def test_option_strings_are_parsed_and_thresholds_validated(tmp_path):
    """`--thumbnails false` / `--strict false` mean false; thresholds outside [0, 1], NaN or booleans stop the job."""
    from scripts.metrics import read_threshold

    net = save_small_model(tmp_path / "m.pt", seed=3)
    kwargs = {"input": [], "network": net, "output_dir": tmp_path / "o", "loader": ScanLoader(SMALL_SHAPE)}
    job = QCJob(**kwargs, thumbnails="false", strict="false", report="False", progress="0", channels_last="true")
    assert (job.thumbnails, job.strict, job.report, job.progress, job.channels_last) == (
        False,
        False,
        False,
        False,
        True,
    )
    with pytest.raises(ValueError, match="strict must be true or false"):
        QCJob(**kwargs, strict="flase")
    for bad in (2, -0.1, float("nan"), "nan", True, "high"):
        with pytest.raises(ValueError, match="threshold must be a number in"):
            QCJob(**kwargs, threshold=bad)
    assert QCJob(**kwargs, threshold="0.25").threshold == 0.25
    for bad in ("true", "2", "NaN", '"0.5"', "[0.5]"):
        (tmp_path / "t.json").write_text('{"threshold": %s}' % bad)
        with pytest.raises(ValueError, match="'threshold' must be a number in"):
            read_threshold(tmp_path / "t.json")
    with pytest.raises(ValueError, match="default_threshold"):
        read_threshold(None, default=2)
    (tmp_path / "t.json").write_text('{"threshold": 0.3}')
    assert read_threshold(tmp_path / "t.json") == 0.3


def test_hostile_files_are_refused_before_allocation(small_demo, tmp_path):
    """Issue 14 defects 10-12 and complex data: a header claiming 1450^3 voxels in a tiny file, a gzip CRC
    error, a t1-linear-shaped image on another affine, complex voxels."""
    import struct

    loader = ScanLoader(SMALL_SHAPE, input_space="t1_linear")
    scan = _demo_scans(small_demo)[0]
    good = nib.load(str(scan))
    header = nib.Nifti1Header()
    header.set_data_shape((1450, 1450, 1450))
    header.set_data_dtype(np.float32)
    bomb = tmp_path / "bomb.nii.gz"
    bomb.write_bytes(gzip.compress(header.binaryblock + b"\0" * 4 + b"\0" * 16))
    crc = tmp_path / "crc.nii.gz"
    blob = bytearray(gzip.compress(scan.read_bytes() if not scan.name.endswith(".gz") else gzip.decompress(scan.read_bytes())))
    struct.pack_into("<I", blob, len(blob) - 8, (struct.unpack_from("<I", blob, len(blob) - 8)[0] + 1) % 2**32)
    crc.write_bytes(bytes(blob))
    assert nib.load(str(crc)).get_fdata().shape == SMALL_SHAPE  # nibabel alone does not notice
    affine = good.affine.copy()
    affine[:3, :3] *= 0.5  # same shape, half the voxel size
    oblique = good.affine.copy()
    c, s_ = np.cos(np.radians(30)), np.sin(np.radians(30))
    oblique[:3, :3] = oblique[:3, :3] @ np.array([[c, -s_, 0], [s_, c, 0], [0, 0, 1]])
    cases = {
        bomb: ("unreadable", "the header declares"),
        crc: ("unreadable", "broken gzip stream"),
        _save(np.asarray(good.dataobj), affine, tmp_path / "small_vox.nii.gz"): ("wrong_space", "not the t1-linear grid"),
        _save(np.asarray(good.dataobj), oblique, tmp_path / "oblique.nii.gz"): ("wrong_space", "not the t1-linear grid"),
        _save(np.asarray(good.dataobj).astype(np.complex64), good.affine, tmp_path / "cplx.nii"): ("not_3d", "complex"),
        scan: ("ok", ""),
    }
    for path, (status, words) in cases.items():
        out = loader({"image": str(path)})
        assert out["status"] == status and words in out["reason"], (path.name, out["status"], out["reason"])


def test_csv_lists_with_a_byte_order_mark_and_missing_cells(small_demo, tmp_path):
    """Issue 14 defect 13: a spreadsheet's UTF-8 BOM is not part of the column name; a line with a missing or
    extra cell still gives one input (a missing path gets a not_found row naming the line)."""
    scans = _demo_scans(small_demo)[:2]
    listing = tmp_path / "list.csv"
    listing.write_text("\ufeffimage,participant_id\n" f"{scans[0]},sub-A\n" f"{scans[1]}\n" ",sub-C\n"
                       f"{scans[0].parent / 'x.nii.gz'},sub-D,extra\n", encoding="utf-8")
    items = collect_inputs(listing)
    assert len(items) == 4
    assert items[0]["image"] == str(scans[0]) and items[0]["participant_id"] == "sub-A"
    assert items[1]["image"] == str(scans[1])
    assert "line 4" in items[2]["image"] and items[2]["participant_id"] == "sub-C"
    assert None not in items[3]
    assert ScanLoader(SMALL_SHAPE)(items[2])["status"] == "not_found"


def test_a_file_name_that_is_not_utf8_gets_its_row_and_the_table_is_written(small_demo, tmp_path):
    """Issue 14 defect 1: one non-UTF-8 file name beside good scans used to fail writing qc.tsv on every run."""
    folder = tmp_path / "in"
    folder.mkdir()
    scans = _demo_scans(small_demo)[:2]
    shutil.copy(scans[0], folder / "sub-A_T1w.nii.gz")
    odd = os.path.join(os.fsencode(folder), b"sub-B\xff_T1w.nii.gz")
    with open(odd, "wb") as f:
        f.write(scans[1].read_bytes())
    net = save_small_model(tmp_path / "m.pt", seed=3)
    for _ in range(2):  # the re-run reads the table back and finds both rows recorded
        job = QCJob(input=str(folder), network=net, output_dir=tmp_path / "out", loader=ScanLoader(SMALL_SHAPE),
                    num_workers=0, saliency="gradcam", thumbnails=True, report=True, progress=False)
        job.run()
        rows = read_qc_table(tmp_path / "out" / "qc.tsv")
        assert sorted(r["status"] for r in rows) == ["ok", "ok"]
        assert os.fsdecode(odd) in {r["path"] for r in rows}
    assert (tmp_path / "out" / "qc_report.html").is_file()


def test_workers_die_with_a_killed_main_process(small_demo, tmp_path):
    """Issue 14 defect 8: SIGKILL to the main process alone used to leave its preprocessing workers running."""
    cmd, _, out = _cli_job(small_demo, tmp_path, copies=3, workers=2)
    log = (tmp_path / "run.log").open("wb")
    proc = subprocess.Popen(cmd, cwd=BUNDLE_ROOT, stdout=log, stderr=log, start_new_session=True)
    journal = out / ".qc" / "journal-rank0.jsonl"
    children: list[int] = []
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if journal.is_file() and len(journal.read_text().splitlines()) >= 2:
            task = Path(f"/proc/{proc.pid}/task/{proc.pid}/children")
            children = [int(c) for c in task.read_text().split()] if task.is_file() else []
            if len(children) >= 2:
                break
        time.sleep(0.05)
    try:
        assert proc.poll() is None and len(children) >= 2, (tmp_path / "run.log").read_text("utf-8", "replace")[-2000:]
        os.kill(proc.pid, signal.SIGKILL)  # the main process only, as an OOM killer or `kill -9 <pid>` would
        proc.wait()
        deadline = time.time() + 20
        alive = children
        while alive and time.time() < deadline:
            alive = [c for c in alive if Path(f"/proc/{c}").exists() and "Z" not in Path(f"/proc/{c}/stat").read_text().split()[2]]
            time.sleep(0.2)
        assert not alive, f"workers {alive} outlived the killed main process"
    finally:
        log.close()
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def test_a_torn_journal_line_is_repaired_and_a_missing_row_fails_the_run(small_demo, tmp_path):
    """Issue 14 defect 6: after a journal line torn by a full disk, the re-run glued the next record to it,
    lost that row and still exited 0."""
    net = save_small_model(tmp_path / "m.pt", seed=3)
    scans = [str(s) for s in _demo_scans(small_demo)[:3]]

    def job(items):
        return QCJob(input=items, network=net, output_dir=tmp_path / "out", loader=ScanLoader(SMALL_SHAPE),
                     num_workers=0, saliency="none", thumbnails=False, report=False, progress=False)

    job(scans[:2]).run()
    journal = tmp_path / "out" / ".qc" / "journal-rank0.jsonl"
    lines = journal.read_text().splitlines(keepends=True)
    journal.write_text(lines[0] + lines[1][: len(lines[1]) // 2])  # the second record torn mid-write ...
    (tmp_path / "out" / "qc.tsv").unlink()  # ... before the table was rewritten
    assert job(scans).run() == {"ok": 3}
    rows = read_qc_table(tmp_path / "out" / "qc.tsv")
    assert sorted(r["path"] for r in rows) == sorted(scans)
    assert len(read_jsonl(journal)) == 3 and journal.read_text().endswith("\n")

    class _Lossy(QCJob):  # a shard that records nothing for one input (as a failed rank would)
        def _merged(self, items):
            return super()._merged(items)[:-1]

    lossy = _Lossy(input=scans, network=net, output_dir=tmp_path / "out", loader=ScanLoader(SMALL_SHAPE),
                   num_workers=0, saliency="none", thumbnails=False, report=False, progress=False)
    with pytest.raises(SystemExit) as exit_info:
        lossy.run()
    assert exit_info.value.code == 4


def test_dicom_folders_with_other_files_and_symlinked_folders_are_found(small_demo, tmp_path):
    """Issue 14 defect 7: a DICOM series folder holding notes.txt or a sub-folder, and a symlinked
    sub-folder holding a scan, were silently skipped (no row); a symlink loop must not hang the walk."""
    root = tmp_path / "in"
    plain = _dicom_with_missing_slice(tmp_path / "src")
    for name, extra in (("with_notes", "notes"), ("with_subfolder", "subfolder")):
        series = root / name
        series.mkdir(parents=True)
        for f in plain.iterdir():  # PACS exports often have no extension: the DICM marker identifies them
            shutil.copy(f, series / f.stem)
        if extra == "notes":
            (series / "notes.txt").write_text("patient moved during the scan")
        else:
            (series / "derived").mkdir()
            shutil.copy(_demo_scans(small_demo)[0], series / "derived" / "derived_T1w.nii.gz")
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    shutil.copy(_demo_scans(small_demo)[1], outside / "linked_T1w.nii.gz")
    (root / "linked").symlink_to(outside, target_is_directory=True)
    (root / "with_notes" / "loop").symlink_to(root, target_is_directory=True)
    found = sorted(Path(it["image"]).relative_to(root).as_posix() for it in collect_inputs(root))
    assert found == ["linked/linked_T1w.nii.gz", "with_notes", "with_subfolder", "with_subfolder/derived/derived_T1w.nii.gz"]
    status = {Path(it["image"]).name: ScanLoader(SMALL_SHAPE)(it)["status"] for it in collect_inputs(root)}
    assert status["with_notes"] == status["with_subfolder"] == "dicom_missing_slice"  # read as series, not skipped


def test_interrupted_restarts_do_not_condemn_a_good_scan(small_demo, tmp_path):
    """Issue 14 defect 9: a job killed twice while a worker held a suspect scan alone marked that good scan
    worker_crashed for good; only crashes the main process saw count (or in-process starts)."""
    net = save_small_model(tmp_path / "m.pt", seed=3)
    scans = [str(s) for s in _demo_scans(small_demo)[:2]]
    state = tmp_path / "out" / ".qc"
    state.mkdir(parents=True)
    # what two interrupted restarts leave: the scan in flight, then twice started alone in a worker
    starts = [{"path": scans[0], "isolated": False, "in_worker": True, "pid": 1},
              {"path": scans[0], "isolated": True, "in_worker": True, "pid": 2},
              {"path": scans[0], "isolated": True, "in_worker": True, "pid": 3}]
    (state / "attempts-rank0.jsonl").write_text("".join(json.dumps(r) + "\n" for r in starts))
    job = QCJob(input=scans, network=net, output_dir=tmp_path / "out", loader=ScanLoader(SMALL_SHAPE), num_workers=1,
                saliency="none", thumbnails=False, report=False, progress=False)
    assert job.run() == {"ok": 2}
    # two crashes that the main process saw still condemn the scan
    with (state / "attempts-rank0.jsonl").open("a") as f:
        f.write(json.dumps({"path": scans[1], "isolated": False, "in_worker": True}) + "\n")
        f.write(json.dumps({"path": scans[1], "crashed": True}) + "\n" + json.dumps({"path": scans[1], "crashed": True}) + "\n")
    (state / "journal-rank0.jsonl").unlink()
    (tmp_path / "out" / "qc.tsv").unlink()
    rows = {r["path"]: r["status"] for r in (job.run() and read_qc_table(tmp_path / "out" / "qc.tsv"))}
    assert rows == {scans[0]: "ok", scans[1]: "worker_crashed"}


class _HangingLoader(ScanLoader):
    """Blocks on one path, like a read from a hung network share that no FIFO check can see."""

    def __init__(self, hang_on: str, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.hang_on = hang_on

    def load(self, path):
        if path == self.hang_on:
            time.sleep(3600)
        return super().load(path)


def test_a_scan_that_hangs_is_stopped_at_the_time_limit(small_demo, tmp_path):
    """Issue 14 defect 5 (per-scan time-outs): a read that blocks hung the job forever, and every re-run hung
    again. The hung scan's workers are stopped at scan_time_limit, it is retried alone, then recorded as
    timed_out; the other scans are scored; a re-run does not try it again."""
    net = save_small_model(tmp_path / "m.pt", seed=3)
    scans = [str(s) for s in _demo_scans(small_demo)[:3]]
    with pytest.raises(ValueError, match="scan_time_limit"):
        QCJob(input=scans, network=net, output_dir=tmp_path / "x", loader=ScanLoader(SMALL_SHAPE), scan_time_limit="soon")

    def job():
        return QCJob(input=scans, network=net, output_dir=tmp_path / "out", loader=_HangingLoader(scans[1], SMALL_SHAPE),
                     num_workers=2, scan_time_limit=3, saliency="none", thumbnails=False, report=False, progress=False)

    start = time.perf_counter()
    assert job().run() == {"ok": 2, "timed_out": 1}
    assert time.perf_counter() - start < 120
    rows = {r["path"]: r for r in read_qc_table(tmp_path / "out" / "qc.tsv")}
    assert rows[scans[1]]["status"] == "timed_out" and "more than 3 s" in rows[scans[1]]["reason"]
    start = time.perf_counter()
    assert job().run() == {"ok": 2, "timed_out": 1}  # recorded: nothing is loaded again
    assert time.perf_counter() - start < 30


def test_fifos_are_refused_not_read_forever(small_demo, tmp_path):
    """Issue 14 defect 5: a data file that is a FIFO (like a hung network share) blocked the job forever."""
    scan = _demo_scans(small_demo)[0]
    folder = tmp_path / "in"
    folder.mkdir()
    os.mkfifo(folder / "sub-A_T1w.nii.gz")
    img = nib.load(str(scan))
    nib.save(nib.AnalyzeImage(np.asarray(img.dataobj, dtype=np.float32), img.affine), str(folder / "sub-B_T1w.hdr"))
    (folder / "sub-B_T1w.img").unlink()
    os.mkfifo(folder / "sub-B_T1w.img")  # the Analyze data file is a FIFO
    dicom = _dicom_with_missing_slice(folder / "sub-C_dicom")
    os.mkfifo(dicom / "pipe")
    shutil.copy(scan, folder / "sub-D_T1w.nii.gz")
    loader = ScanLoader(SMALL_SHAPE)
    statuses = {}
    for item in collect_inputs(folder):
        start = time.perf_counter()
        out = loader(item)
        assert time.perf_counter() - start < 60
        statuses[Path(item["image"]).name] = (out["status"], out["reason"])
    assert statuses["sub-D_T1w.nii.gz"][0] == "ok"
    for name in ("sub-A_T1w.nii.gz", "sub-C_dicom"):
        assert statuses[name][0] == "unreadable" and "not a regular file" in statuses[name][1], statuses[name]
    bad = [v for k, v in statuses.items() if k.startswith("sub-B")]
    assert bad and all(v[0] == "unreadable" and "not a regular file" in v[1] for v in bad), statuses


def test_minor_defects_analyze_pairs_lock_and_plain_numbers_in_reasons(small_demo, tmp_path):
    """Issue 14 defect 14: an .hdr/.img pair gave two rows; two jobs on one output folder both did all the
    work; reasons printed numpy scalars (np.int64(169))."""
    import fcntl

    folder = tmp_path / "in"
    folder.mkdir()
    img = nib.load(str(_demo_scans(small_demo)[0]))
    nib.save(nib.AnalyzeImage(np.asarray(img.dataobj, dtype=np.float32), img.affine), str(folder / "sub-A_T1w.hdr"))
    _save(np.ones((30, 1, 40), np.float32), np.eye(4), folder / "sub-B_T1w.nii.gz")  # a single slice
    items = collect_inputs(folder)
    assert sorted(Path(it["image"]).name for it in items) == ["sub-A_T1w.hdr", "sub-B_T1w.nii.gz"]
    reason = ScanLoader(SMALL_SHAPE)(items[1])["reason"]
    assert "np." not in reason and "(30, 1, 40)" in reason
    net = save_small_model(tmp_path / "m.pt", seed=3)
    state = tmp_path / "out" / ".qc"
    state.mkdir(parents=True)
    with open(state / "lock-rank0", "a+") as held:  # another job holds the folder
        fcntl.flock(held.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        job = QCJob(input=str(folder), network=net, output_dir=tmp_path / "out", loader=ScanLoader(SMALL_SHAPE),
                    num_workers=0, saliency="none", thumbnails=False, report=False, progress=False)
        with pytest.raises(RuntimeError, match="another QC job"):
            job.run()
    counts = job.run()  # released: the job runs (one row per scan), and releases it again
    assert sum(counts.values()) == 2 and counts["not_3d"] == 1
    assert job.run() == counts


def test_every_convolutional_network_declares_its_gradcam_layer(tmp_path):
    """Issue 14: Grad-CAM hard-coded a Conv5FC3 layer name, so ResNet3D and SE-CNN lost their saliency maps."""
    from scripts.networks import SECNN, Conv5FC3, ResNet3D, ViT3D

    torch.manual_seed(0)
    x = torch.randn(1, *SMALL_SHAPE)
    for net in (Conv5FC3(input_size=SMALL_SHAPE), ResNet3D(input_size=SMALL_SHAPE, channels=(4, 8, 8)),
                SECNN(input_size=SMALL_SHAPE, channels=(4, 8, 8))):
        job = QCJob(input=[], network=net.eval(), output_dir=tmp_path / "o", loader=ScanLoader(SMALL_SHAPE),
                    progress=False)
        assert job.saliency == "gradcam" and job.saliency_layer in dict(net.named_modules())
        prob, sal = job._gradcam(x)
        with torch.no_grad():
            assert prob == pytest.approx(torch.softmax(net(x[None]), 1)[0, 1].item(), abs=1e-5)
        assert sal.shape == SMALL_SHAPE and np.isfinite(sal).all()
    vit = ViT3D(input_size=SMALL_SHAPE, patch_grid=(2, 2, 2), hidden_size=32, mlp_dim=64, num_layers=1, num_heads=2)
    job = QCJob(input=[], network=vit, output_dir=tmp_path / "v", loader=ScanLoader(SMALL_SHAPE), progress=False)
    assert job.saliency == "none"


def test_lost_thumbnails_are_regenerated_on_a_rerun(small_demo, tmp_path):
    """Issue 14 defect 14: a thumbnail deleted after a run was never made again (the report showed a hole)."""
    from scripts.qc import thumbnail_name

    net = save_small_model(tmp_path / "m.pt", seed=3)
    scans = [str(s) for s in _demo_scans(small_demo)[:2]]

    def run():
        return QCJob(input=scans, network=net, output_dir=tmp_path / "out", loader=ScanLoader(SMALL_SHAPE),
                     num_workers=0, saliency="gradcam", thumbnails=True, report=False, progress=False).run()

    assert run() == {"ok": 2}
    lost = tmp_path / "out" / "qc_thumbnails" / thumbnail_name(scans[0])
    kept = tmp_path / "out" / "qc_thumbnails" / thumbnail_name(scans[1])
    before = kept.stat().st_mtime_ns
    lost.unlink()
    assert run() == {"ok": 2}
    assert lost.is_file() and kept.stat().st_mtime_ns == before  # only the lost one was redone
    assert len(read_qc_table(tmp_path / "out" / "qc.tsv")) == 2
