"""Tests of scripts.iqm: each IQM on phantoms with a known answer, invariances, agreement with a literal
scikit-image implementation, the IQM cache, and the random-forest baseline end to end + McNemar."""

from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys
import warnings

import nibabel as nib
import numpy as np
import pytest
from scipy.signal import convolve2d
from skimage.exposure import equalize_hist
from skimage.filters import threshold_otsu
from skimage.morphology import convex_hull_image

import scripts.iqm as iqm
from scripts.iqm import IQM_NAMES, foreground_masks, slice_iqms, volume_iqms
from scripts.metrics import mcnemar_files
from scripts.metrics import binary_metrics

BUNDLE_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
R0, R1, C0, C1 = 10, 30, 12, 36  # foreground rectangle (rows, cols) of the 40 x 48 phantom slices


def _stack_to_volume(slices: np.ndarray) -> np.ndarray:
    """(S, H, W) -> (H, W, S + 1) volume whose axial slices 1..S are ``slices`` (slice 0 is skipped)."""
    return np.concatenate([slices[:1], slices], axis=0).transpose(1, 2, 0)


def _iqm(values: np.ndarray, name: str) -> np.ndarray:
    return values[:, IQM_NAMES.index(name)]


def _checkerboard_slices(n: int = 3) -> np.ndarray:
    """Foreground rectangle alternating 8/12 (exactly half of each) on a background of 1."""
    rr, cc = np.mgrid[:40, :48]
    odd = (rr + cc) % 2 == 1
    img = np.ones((40, 48))
    inside = (rr >= R0) & (rr < R1) & (cc >= C0) & (cc < C1)
    img[inside] = np.where(odd, 12.0, 8.0)[inside]
    return np.repeat(img[None], n, axis=0)


def _rect_mask() -> np.ndarray:
    m = np.zeros((40, 48), bool)
    m[R0:R1, C0:C1] = True
    return m


def test_foreground_is_the_rectangle_and_matches_skimage():
    sl = _checkerboard_slices()
    fg = foreground_masks(sl)
    assert (fg == _rect_mask()[None]).all()
    # literal recipe with scikit-image on one slice (MRQy's, with the slice rescaled to [0, 255])
    img = sl[0]
    h = equalize_hist(img) * 255
    img255 = (img - img.min()) / (img.max() - img.min()) * 255
    new = np.mean(img > threshold_otsu(img)) * img255 + np.mean(h > threshold_otsu(h)) * h
    assert (convex_hull_image(new > threshold_otsu(new)) == fg[0]).all()
    assert (foreground_masks(sl, mrqy_compatible=True) == _rect_mask()[None]).all()


def test_checkerboard_known_values():
    values, kept = slice_iqms(_checkerboard_slices())
    assert kept.all()
    expected = {
        "MEAN": 10.0,  # f: half 8, half 12
        "RNG": 4.0,
        "VAR": 4.0,
        "CV": 20.0,  # 100 * 2 / 10
        "CJV": 2.0 / 9.0,  # (std f + std b) / |mean f - mean b| = (2 + 0) / |10 - 1|
        "FBER": 104.0,  # median(f^2) = (64 + 144) / 2, median(b^2) = 1
    }
    for name, val in expected.items():
        np.testing.assert_allclose(_iqm(values, name), val, rtol=1e-12, err_msg=name)
    vol = volume_iqms(_stack_to_volume(_checkerboard_slices()))
    assert vol["CV"] == pytest.approx(20.0) and vol["FBER"] == pytest.approx(104.0)
    assert math.isnan(vol["SNR1"])  # std(b) = 0: infinite on every slice, dropped like MRQy


def test_constant_rectangle_on_zero_background():
    sl = np.zeros((2, 40, 48))
    sl[:, R0:R1, C0:C1] = 10.0
    values, kept = slice_iqms(sl)
    assert kept.all()
    assert _iqm(values, "CV") == pytest.approx([0.0, 0.0], abs=1e-12)
    assert _iqm(values, "VAR") == pytest.approx([0.0, 0.0], abs=1e-12)
    assert _iqm(values, "CJV") == pytest.approx([0.0, 0.0], abs=1e-12)  # (0 + 0) / 10
    assert _iqm(values, "FBER") == pytest.approx([0.0, 0.0])  # MRQy: 0 when median(b^2) < 1e-3
    assert np.isnan(_iqm(values, "SNR1")).all()  # std(b) = 0: infinite, dropped like MRQy


def test_patch_measures_known_values():
    """Constant 10 rectangle with one 20 pixel; background 2 with one 3 pixel far from the head."""
    img = np.full((40, 48), 2.0)
    img[R0:R1, C0:C1] = 10.0
    img[20, 24] = 20.0
    img[3, 4] = 3.0
    assert (foreground_masks(img[None])[0] == _rect_mask()).all()
    values, _ = slice_iqms(img[None])
    pf = np.array([10.0] * 24 + [20.0])  # centred 5x5 patch at the maximum of F
    pb = np.array([2.0] * 24 + [3.0])  # centred 5x5 patch at the maximum of B
    b = np.array([2.0] * (40 * 48 - 480 - 1) + [3.0])
    f = np.array([10.0] * 479 + [20.0])
    exp = {
        "SNR1": f.std() / b.std(),
        "CJV": (f.std() + b.std()) / abs(f.mean() - b.mean()),
        "SNR2": pf.mean() / b.std(),
        "SNR3": pf.mean() / pf.std(),
        "SNR4": pf.mean() / pb.std(),
        "CNR": (pf.mean() - pb.mean()) / pb.std(),
        "CVP": pf.std() / pf.mean(),
    }
    for name, val in exp.items():
        assert _iqm(values, name)[0] == pytest.approx(val, rel=1e-12), name
    # MRQy's window (rows a-5..a-1, cols b-5..b-1) misses the maximum: a constant 10 patch, std 0
    compat, _ = slice_iqms(img[None], mrqy_compatible=True)
    assert np.isnan(_iqm(compat, "SNR3")[0])
    assert _iqm(compat, "CVP")[0] == 0.0


def test_efc_known_values_and_mrqy_quirk():
    fg = np.ones((2, 16, 16), bool)
    sl = np.zeros((2, 16, 16))
    sl[0] = 5.0  # energy spread evenly over all pixels: maximal entropy, EFC = 1
    sl[1, 7, 7] = 5.0  # all energy in one pixel: EFC = 0
    values, _ = slice_iqms(sl, fg)
    np.testing.assert_allclose(_iqm(values, "EFC"), [1.0, 0.0], atol=1e-12)
    compat, _ = slice_iqms(sl, fg, mrqy_compatible=True)
    n = 256
    e_max = abs(n * (1 / math.sqrt(n)) * math.log(1 / math.sqrt(n)))
    b_max = 5.0 * 16
    expected0 = n * (5.0 / b_max) * math.log((5.0 + 1e16) / b_max) / e_max
    assert _iqm(compat, "EFC")[0] == pytest.approx(expected0, rel=1e-9)


def test_cpp_and_psnr_match_direct_formulas():
    rng = np.random.default_rng(1)
    sl = rng.uniform(1, 100, (3, 20, 24))
    fg = np.zeros_like(sl, bool)
    fg[:, 2:20, 3:21] = True  # touches the bottom border so that CPP is not 0
    kernel = np.full((3, 3), -1 / 8)
    kernel[1, 1] = 1.0
    values, _ = slice_iqms(sl, fg)
    compat, _ = slice_iqms(sl, fg, mrqy_compatible=True)
    from skimage.filters import median

    for s in range(3):
        f = sl[s] * fg[s]
        assert _iqm(values, "CPP")[s] == pytest.approx(convolve2d(f, kernel, mode="same").mean(), rel=1e-10)
        rmse = np.sqrt(np.mean((f - median(f, np.ones((5, 5)))) ** 2))
        assert _iqm(values, "PSNR")[s] == pytest.approx(20 * np.log10(f.max() / rmse), rel=1e-10)
        rmse_c = np.sqrt(np.mean((f - median(f / f.max(), np.ones((5, 5)))) ** 2))
        assert _iqm(compat, "PSNR")[s] == pytest.approx(20 * np.log10(f.max() / rmse_c), rel=1e-10)


def _head_phantom(shape=(40, 48, 44), seed=0, motion=False, scale=1.0) -> np.ndarray:
    """Ellipsoidal 'head' (scalp 300, brain 500, core 700) in Rician noise; motion adds ghosts + blur."""
    rng = np.random.default_rng(seed)
    grids = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij")
    r = np.sqrt(sum((g / a) ** 2 for g, a in zip(grids, rng.uniform(0.75, 0.85, 3))))
    vol = np.where(r < 1.0, 300.0, 0.0)
    vol[r < 0.8] = 500.0
    vol[r < 0.45] = 700.0
    vol *= rng.uniform(0.8, 1.2)
    if motion:  # half of the phase-encoding lines acquired at a shifted position, then a mild blur
        k = np.fft.fftn(vol)
        moved = np.fft.fftn(np.roll(vol, int(rng.integers(3, 6)), axis=1))
        lines = rng.random(shape[1]) < 0.5
        k[:, lines, :] = moved[:, lines, :]
        vol = np.abs(np.fft.ifftn(k))
        from scipy.ndimage import gaussian_filter

        vol = gaussian_filter(vol, 1.0)
    sigma = 15.0
    vol = np.sqrt((vol + rng.normal(0, sigma, shape)) ** 2 + rng.normal(0, sigma, shape) ** 2)
    return (vol * scale).astype(np.float32)


def test_scale_invariance():
    vol = _head_phantom(seed=3)
    a = volume_iqms(vol)
    b = volume_iqms(vol * 3.7)
    for name in ("CV", "SNR1", "SNR2", "SNR3", "SNR4", "CNR", "CVP", "CJV", "EFC", "PSNR", "FBER"):
        assert b[name] == pytest.approx(a[name], rel=1e-5), name
    assert b["MEAN"] == pytest.approx(3.7 * a["MEAN"], rel=1e-5)
    assert b["VAR"] == pytest.approx(3.7**2 * a["VAR"], rel=1e-5)
    # MRQy's foreground adds the raw slice to its equalised version: the mask, hence CV, depends on the
    # intensity scale; and its PSNR compares raw F with an image in [0, 1], which matters when F ~ 1
    c, d = volume_iqms(vol, mrqy_compatible=True), volume_iqms(vol * 3.7, mrqy_compatible=True)
    assert abs(d["CV"] - c["CV"]) > 0.01 * c["CV"]
    e = volume_iqms(vol / vol.max(), mrqy_compatible=True)
    assert abs(e["PSNR"] - c["PSNR"]) > 1.0


@pytest.mark.parametrize("compat", [False, True])
def test_vectorised_matches_literal_skimage_version(compat):
    vol = _head_phantom(shape=(40, 48, 12), seed=5, motion=True)
    fast = volume_iqms(vol, mrqy_compatible=compat)
    ref = iqm.volume_iqms_reference(vol, mrqy_compatible=compat)
    for name in IQM_NAMES:
        assert fast[name] == pytest.approx(ref[name], rel=1e-9, abs=1e-12), name


def test_real_size_volume_matches_reference():
    """One t1-linear-sized volume (169 x 208 x 179): the vectorised IQMs equal the scikit-image loop's."""
    vol = _head_phantom(shape=(169, 208, 179), seed=11)
    fast = volume_iqms(vol, mrqy_compatible=True)
    ref = iqm.volume_iqms_reference(vol, mrqy_compatible=True)
    assert all(np.isfinite(fast[k]) for k in IQM_NAMES)
    for name in IQM_NAMES:
        assert fast[name] == pytest.approx(ref[name], rel=1e-9, abs=1e-12), name


def test_convex_hull_and_otsu_match_skimage():
    rng = np.random.default_rng(7)
    for _ in range(20):
        m = rng.random((30, 37)) < 0.02
        assert (iqm._convex_hull_2d(m) == convex_hull_image(m)).all()
    x = rng.gamma(2.0, 50.0, (6, 500))
    np.testing.assert_array_equal(iqm._batched_otsu(x), [threshold_otsu(r) for r in x])
    np.testing.assert_array_equal(iqm._batched_equalize(x, iqm._batched_histogram(x)), [equalize_hist(r) for r in x])


def test_no_foreground_gives_nan_and_warning():
    with pytest.warns(RuntimeWarning, match="no foreground"):
        res = volume_iqms(np.zeros((20, 24, 10)), name="empty.nii.gz")
    assert all(math.isnan(v) for v in res.values())


def _save(path, vol):
    nib.save(nib.Nifti1Image(np.asarray(vol, np.float32), np.diag([1.0, 1.0, 1.0, 1.0])), str(path))


def test_iqm_table_cache_and_bad_files(tmp_path, monkeypatch):
    paths = [str(tmp_path / f"img{i}.nii.gz") for i in range(3)]
    _save(paths[0], _head_phantom(shape=(24, 28, 10), seed=0))
    _save(paths[1], np.zeros((24, 28, 10)))
    with open(paths[2], "w") as fh:
        fh.write("not a nifti")
    table = str(tmp_path / "iqms.tsv")
    calls = []
    worker = iqm._iqm_worker
    monkeypatch.setattr(iqm, "_iqm_worker", lambda job: calls.append(job[0]) or worker(job))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        rows = iqm.compute_iqm_table(paths, table, progress=False)
    assert [rows[p]["status"] for p in paths] == ["ok", "no_foreground", "error"]
    assert "img2.nii.gz" in rows[paths[2]]["reason"]
    assert np.isfinite(rows[paths[0]]["CV"]) and math.isnan(rows[paths[1]]["CV"])
    assert iqm.read_iqm_table(table)[paths[0]]["CV"] == rows[paths[0]]["CV"]  # round trip of the TSV
    # second run: nothing recomputed; after touching a file only that one (errors are retried)
    calls.clear()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        iqm.compute_iqm_table(paths[:2], table, progress=False)
        assert calls == []
        st = os.stat(paths[0])
        os.utime(paths[0], ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
        iqm.compute_iqm_table(paths, table, progress=False)
    assert calls == [paths[0], paths[2]]
    # other settings -> recomputed
    calls.clear()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        iqm.compute_iqm_table(paths[:1], table, mrqy_compatible=True, progress=False)
    assert calls == [paths[0]]


def _make_dataset(root, n_participants=16) -> dict:
    """Each participant: one clean session (label 0) and one with motion (label 1)."""
    os.makedirs(root / "images", exist_ok=True)
    items = []
    for p in range(n_participants):
        for ses, motion in (("ses-M000", False), ("ses-M006", True)):
            rel = f"images/sub-{p:02d}_{ses}_T1w.nii.gz"
            _save(root / rel, _head_phantom(seed=100 * p + motion, motion=motion))
            items.append({"image": rel, "label": int(motion), "participant_id": f"sub-{p:02d}", "session_id": ses})
    _save(root / items[0]["image"], np.zeros((40, 48, 44)))  # a training volume without foreground: NaN IQMs
    splits = {"training": items[:20], "validation": items[20:24], "test": items[24:]}
    with open(root / "datalist.json", "w") as fh:
        json.dump(splits, fh)
    return splits


def test_baseline_end_to_end_and_mcnemar(tmp_path):
    data = tmp_path / "data"
    splits = _make_dataset(data)
    out = tmp_path / "out"
    cmd = [
        sys.executable, "-m", "monai.bundle", "run", "--config_file", "configs/iqm_baseline.yaml",
        "--dataset_dir", str(data), "--output_dir", str(out), "--n_iter", "5", "--num_workers", "2", "--n_jobs", "1",
        "--param_distributions#n_estimators", "[10, 30]", "--progress", "False",
    ]  # fmt: skip
    proc = subprocess.run(cmd, cwd=BUNDLE_ROOT, capture_output=True, text=True, encoding="utf-8", errors="replace", timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]

    with open(out / "predictions.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
        assert list(rows[0].keys()) == ["image", "participant_id", "session_id", "label", "prob_motion", "prediction"]
    test_items = splits["test"]
    assert [r["image"] for r in rows] == [os.path.abspath(data / it["image"]) for it in test_items]
    assert [int(r["label"]) for r in rows] == [it["label"] for it in test_items]
    probs = np.array([float(r["prob_motion"]) for r in rows])
    assert [int(r["prediction"]) for r in rows] == (probs >= 0.5).astype(int).tolist()
    with open(out / "metrics.json") as fh:
        metrics = json.load(fh)
    assert metrics == pytest.approx(binary_metrics([it["label"] for it in test_items], probs).as_dict(), nan_ok=True)
    assert metrics["balanced_accuracy"] >= 0.75  # the synthetic ghosting is easy to see
    with open(out / "hyperparameters.json") as fh:
        hp = json.load(fh)
    assert hp["best_params"]["n_estimators"] in (10, 30) and hp["n_train"] == 24 and len(hp["iqm_names"]) == 13
    table = iqm.read_iqm_table(str(out / "iqms.tsv"))
    statuses = [table[os.path.abspath(data / it["image"])]["status"] for it in splits["training"]]
    assert len(table) == 32 and statuses[0] == "no_foreground"
    assert sum(r["status"] == "ok" for r in table.values()) == 31

    # McNemar against a fake CNN that is right on every test image but the first
    cnn = tmp_path / "cnn_predictions.csv"
    with open(cnn, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["image", "participant_id", "session_id", "label", "prob_motion", "prediction"])
        for i, r in enumerate(rows):
            lab = int(r["label"])
            pred = 1 - lab if i == 0 else lab
            w.writerow([r["image"], r["participant_id"], r["session_id"], lab, float(pred), pred])
    iqm_ok = np.array([int(r["prediction"]) == int(r["label"]) for r in rows])
    res = mcnemar_files(out / "predictions.csv", cnn, output=tmp_path / "mcnemar.json")
    assert res["n"] == len(rows)
    assert res["b"] == int(iqm_ok[0])  # IQM right where the CNN is wrong
    assert res["c"] == int((~iqm_ok[1:]).sum())  # CNN right where the IQM forest is wrong
    assert res["both_wrong"] == int(not iqm_ok[0])
    assert json.loads((tmp_path / "mcnemar.json").read_text())["p_value"] == pytest.approx(res["p_value"])


def test_config_defaults():
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(os.path.join(BUNDLE_ROOT, "configs", "iqm_baseline.yaml"))
    parser["dataset_dir"] = "somewhere"
    assert tuple(parser.get_parsed_content("iqm_names")) == iqm.DEFAULT_IQMS and len(iqm.DEFAULT_IQMS) == 13
    baseline = parser.get_parsed_content("baseline")
    assert isinstance(baseline, iqm.IQMBaseline)
    assert (baseline.n_iter, baseline.cv_folds, baseline.mrqy_compatible, baseline.threshold) == (300, 5, False, 0.5)
    assert baseline.output_dir == "./eval/iqm_baseline"
    assert baseline.datalist == os.path.join("somewhere", "datalist.json")
