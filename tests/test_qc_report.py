"""The QC HTML report (scripts/qc/report.py): thumbnails, histogram, paging with 10,000 scans, and a
look at it in headless Chromium (skipped when no Chromium is installed)."""

from __future__ import annotations

import io
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import SMALL_SHAPE
from ecosystem_helpers import save_small_model

from scripts.qc import QCJob, ScanLoader, read_qc_table, thumbnail_name
from scripts.qc.report import central_slices, probability_histogram_svg, render_thumbnail, write_report

CHROMIUM = next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)), None)
needs_chromium = pytest.mark.skipif(CHROMIUM is None, reason="no Chromium installed (apt-get install chromium)")


def _cards(dom: str) -> int:
    """Cards rendered in a DOM dump."""
    return len(re.findall(r'<div class="card (?:motion|no_motion)"', dom))


def _chromium(*args: str) -> subprocess.CompletedProcess:
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--hide-scrollbars", *args]
    return subprocess.run(cmd, capture_output=True, text=True, encoding="utf-8", errors="replace", timeout=120)


def test_central_slices_orientation():
    vol = np.zeros((10, 12, 14), np.float32)
    vol[9, 6, 7] = 1.0  # rightmost voxel on the central lines
    axial, coronal, sagittal = central_slices(vol)
    assert axial.shape == (12, 10) and coronal.shape == (14, 10) and sagittal.shape == (14, 12)
    assert axial[12 - 1 - 6, 9] == 1.0 and coronal[14 - 1 - 7, 9] == 1.0  # superior/anterior up
    vol[:] = 0
    vol[5, 11, 7] = 1.0  # most anterior voxel of the sagittal slice: on its right
    assert central_slices(vol)[2][14 - 1 - 7, 11] == 1.0


def test_thumbnail_shows_saliency_over_the_slices():
    rng = np.random.default_rng(0)
    vol = rng.random(SMALL_SHAPE).astype(np.float32) * 0.2
    sal = np.zeros(SMALL_SHAPE, np.float32)
    sal[:, :, :] = 1.0
    plain = Image.open(io.BytesIO(render_thumbnail(vol, None, height=64)))
    hot = Image.open(io.BytesIO(render_thumbnail(vol, sal, height=64)))
    assert plain.format == hot.format == "JPEG" and plain.size == hot.size and plain.size[1] == 64
    p, h = np.asarray(plain).astype(float), np.asarray(hot).astype(float)
    assert abs(p[..., 0].mean() - p[..., 2].mean()) < 3  # grey
    assert h[..., 0].mean() > h[..., 2].mean() + 20  # the saliency tint is warm


def test_histogram_counts():
    svg = probability_histogram_svg([0.01, 0.02, 0.99], threshold=0.3, bins=10)
    assert svg.count("<rect") == 10 and "0.00-0.10: 2 scans" in svg and "0.90-1.00: 1 scans" in svg
    assert "threshold 0.3" in svg


def _rows(n: int, thumbs: Path, jpeg: bytes) -> list[dict]:
    thumbs.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(1)
    rows = []
    for i in range(n):
        path = f"/data/sub-{i:05d}/ses-M000/anat/sub-{i:05d}_ses-M000_T1w.nii.gz"
        p = float(rng.beta(0.7, 2.0))
        (thumbs / thumbnail_name(path)).write_bytes(jpeg)
        rows.append({"path": path, "participant_id": f"sub-{i:05d}", "session_id": "ses-M000", "status": "ok",
                     "reason": "", "prob_motion": f"{p:.6f}", "decision": "motion" if p >= 0.5 else "no_motion"})
    rows.append({"path": "/data/broken.nii.gz", "participant_id": "", "session_id": "", "status": "unreadable",
                 "reason": "not a readable NIfTI file", "prob_motion": "", "decision": ""})
    return rows


def test_report_is_sorted_and_paged(tmp_path):
    jpeg = render_thumbnail(np.random.default_rng(0).random(SMALL_SHAPE), None, height=16)
    rows = _rows(300, tmp_path / "thumbs", jpeg)
    html = write_report(rows, tmp_path / "r.html", tmp_path / "thumbs", threshold=0.5, page_size=25).read_text()
    data = html.split('id="qc-data">')[1].split("</script>")[0]
    import json

    items = json.loads(data)
    assert len(items) == 300 and [d["prob"] for d in items] == sorted((d["prob"] for d in items), reverse=True)
    assert 'data-page-size="25"' in html and "broken.nii.gz" in html and "unreadable" in html


@pytest.fixture(scope="module")
def real_report(small_demo, tmp_path_factory):
    """A QC run over the demo scans and two bad inputs, with thumbnails and Grad-CAM."""
    root = tmp_path_factory.mktemp("qc_report")
    net = save_small_model(root / "m.pt", seed=4)
    scans = sorted(small_demo.rglob("*.nii.gz"))
    (root / "broken.nii.gz").write_bytes(b"not a scan")
    from monai.transforms import Compose, NormalizeIntensityd, ScaleIntensityRangePercentilesd

    norm = Compose([ScaleIntensityRangePercentilesd("image", 1, 100, 0.0, 1.0, clip=True), NormalizeIntensityd("image")])
    job = QCJob(input=[str(s) for s in scans] + [str(root / "broken.nii.gz"), str(root / "missing.nii")],
                network=net, output_dir=root / "out", loader=ScanLoader(SMALL_SHAPE, norm), num_workers=0,
                progress=False, report_page_size=6)
    job.run()
    return root / "out"


def test_real_run_report_has_thumbnails_with_saliency(real_report):
    rows = read_qc_table(real_report / "qc.tsv")
    scored = [r for r in rows if r["status"] == "ok"]
    assert len(scored) == len(rows) - 2
    for r in scored:
        thumb = Image.open(real_report / "qc_thumbnails" / thumbnail_name(r["path"]))
        assert thumb.size[1] == 96 and thumb.size[0] > 2 * 96  # three slices side by side
    assert (real_report / "qc_report.html").stat().st_size > 1000


@needs_chromium
def test_report_renders_in_headless_chromium(real_report, tmp_path):
    page = real_report / "qc_report.html"
    dom = _chromium("--virtual-time-budget=5000", "--dump-dom", page.as_uri())
    assert dom.returncode == 0, dom.stderr[-2000:]
    assert _cards(dom.stdout) == 6  # first page only
    assert "page 1 of 2" in dom.stdout and 'src="data:image/jpeg;base64,' in dom.stdout
    shot = tmp_path / "qc_report.png"
    res = _chromium(f"--screenshot={shot}", "--window-size=1200,1400", "--virtual-time-budget=5000", page.as_uri())
    assert res.returncode == 0 and shot.is_file(), res.stderr[-2000:]
    pixels = np.asarray(Image.open(shot).convert("L"), dtype=float)
    assert pixels.shape == (1400, 1200) and pixels.std() > 10  # not a blank page


@needs_chromium
def test_report_with_10000_scans_opens_on_its_first_page(small_demo, tmp_path):
    import nibabel as nib

    scan = np.asarray(nib.load(sorted(small_demo.rglob("*.nii.gz"))[0]).dataobj, dtype=np.float32)
    sal = np.zeros(SMALL_SHAPE, np.float32)
    sal[10:30, 20:40, 15:35] = 1.0
    jpeg = render_thumbnail(scan, sal)  # a realistic picture: a demo scan with a saliency blob
    rows = _rows(10_000, tmp_path / "thumbs", jpeg)
    page = write_report(rows, tmp_path / "big.html", tmp_path / "thumbs", page_size=50)
    dom = _chromium("--virtual-time-budget=20000", "--dump-dom", page.as_uri())
    assert dom.returncode == 0, dom.stderr[-2000:]
    assert len(dom.stdout) < 2_000_000  # the data block is dropped once parsed: only a page of pictures stays
    assert _cards(dom.stdout) == 50 and "page 1 of 200 (10000 scans)" in dom.stdout
