"""Tests of scripts/synthetic_heads.py at 4 mm (43x52x45): determinism, class parity, tissues, nuisances."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from scripts import synthetic_heads as sh

VOXEL = 4.0
SHAPE = (43, 52, 45)


def _pair(seed: int, **kwargs) -> dict:
    gen = sh.SyntheticHeadPaird(voxel_size=VOXEL, resampler="grid_sample", **kwargs)
    gen.set_random_state(seed=seed)
    return gen({"id": 0})


def test_pair_shapes_labels_and_determinism():
    a, b, c = _pair(1), _pair(1), _pair(2)
    assert tuple(a["image"].shape) == (2, *SHAPE)
    assert a["label"].tolist() == [0, 1]
    assert torch.equal(a["image"], b["image"])
    assert not torch.equal(a["image"], c["image"])
    assert torch.isfinite(a["image"]).all() and a["image"].min() >= 0
    # the moved image differs from the clean one, the head is visible
    assert not torch.equal(a["image"][0], a["image"][1])
    assert a["motion"]["level"] > 0


def test_only_motion_separates_the_classes(monkeypatch):
    """With a motion of zero amplitude the 'moved' image equals the clean one: every nuisance is shared."""

    draw = sh.sample_motion_params

    def no_motion(rng, simulators=("image",), severity=(0.8, 8.0), weights=None):
        params = draw(rng, ["image"], severity, None)
        n = len(params["degrees"])
        return params | {"degrees": [[0.0] * 3] * n, "translation": [[0.0] * 3] * n}

    monkeypatch.setattr(sh, "sample_motion_params", no_motion)
    for seed in range(4):
        d = _pair(seed, simulators=["image"])
        clean, moved = d["image"][0], d["image"][1]
        assert torch.allclose(clean, moved, atol=1.0), f"seed {seed}: max diff {(clean - moved).abs().max()}"


def test_single_head_labels_share_the_draw():
    """SyntheticHeadd with the same seed gives the same head whether or not it is moved."""
    clean = sh.SyntheticHeadd(prob=0.0, voxel_size=VOXEL, resampler="grid_sample").set_random_state(seed=5)({})
    moved = sh.SyntheticHeadd(prob=1.0, voxel_size=VOXEL, resampler="grid_sample").set_random_state(seed=5)({})
    assert clean["label"] == 0 and moved["label"] == 1
    assert clean["motion"]["level"] == 0.0 and moved["motion"]["level"] > 0
    pair = sh.SyntheticHeadPaird(voxel_size=VOXEL, resampler="grid_sample").set_random_state(seed=5)({})
    assert torch.equal(clean["image"][0], pair["image"][0])
    assert torch.equal(moved["image"][0], pair["image"][1])


def test_anatomy_tissues():
    rng = np.random.RandomState(0)
    w = sh.render_anatomy(sh.sample_anatomy_params(rng), VOXEL)
    assert w.dtype == torch.uint8 and w.shape == (len(sh.TISSUES), *SHAPE)
    total = w.float().sum(0)
    assert (total - 255).abs().max() <= len(sh.TISSUES)  # weights sum to one voxel
    volume = {name: float(w[i].float().sum() / 255 * VOXEL**3 / 1000) for i, name in enumerate(sh.TISSUES)}
    assert 400 < volume["wm"] < 1000 and 500 < volume["gm"] < 1200  # cm3 (the template maps are soft)
    for tissue in ("bone", "marrow", "fat", "skin", "muscle", "csf", "vitreous", "dura"):
        assert volume[tissue] > 1.0, tissue
    # brain in the middle, background in the corner
    c = [s // 2 for s in SHAPE]
    assert w[sh.TISSUES.index("background"), 0, 0, -1] == 255
    assert w[[sh.TISSUES.index(t) for t in ("wm", "gm", "csf")], c[0], c[1], c[2]].sum() >= 250


def test_contrast_keeps_t1_order_and_regimes_differ():
    rng = np.random.RandomState(3)
    for _ in range(50):
        v = sh.sample_contrast_params(rng)["values"]
        assert v["wm"] >= v["gm"] >= v["csf"] >= 0
        assert v["fat"] > v["muscle"] > v["bone"]
    held = [sh.sample_anatomy_params(rng, "anatomy_heldout")["atrophy"] for _ in range(20)]
    train_hi = sh.REGIMES["train"]["atrophy"][1]
    assert min(held) >= train_hi
    gm = [sh.sample_contrast_params(rng, "contrast_heldout")["values"]["gm"] for _ in range(20)]
    assert min(gm) > sh.REGIMES["train"]["gm_wm"][1]


@pytest.mark.parametrize("name", sorted(sh.NUISANCES))
def test_each_nuisance_alone(name):
    rng = np.random.RandomState(7)
    params = sh.sample_acquisition_params(rng, sh.NUISANCES[name], base="none")
    obj, head = sh.render_head(sh.sample_head_params(np.random.RandomState(1)), VOXEL)
    img = sh.apply_acquisition(obj, head, params, VOXEL)
    assert img.shape == SHAPE and torch.isfinite(img).all() and img.max() > 0
    if name == "fov_cut":
        cut = int(round(params["fov_cut_mm"] / VOXEL))
        part = img[..., -cut:] if params["fov_cut_top"] else img[..., :cut]
        assert (part == 0).all()
    if name == "none":
        assert params["lowres_mm"] == 0 and params["gibbs_keep"] == 1 and params["fov_cut_mm"] == 0


def test_low_resolution_removes_detail_along_its_axis():
    obj, head = sh.render_head(sh.sample_head_params(np.random.RandomState(1)), VOXEL)
    base = sh.sample_acquisition_params(np.random.RandomState(0), base="none")
    sharp = sh.apply_acquisition(obj, head, base, VOXEL)
    low = sh.apply_acquisition(obj, head, base | {"lowres_mm": 12.0, "lowres_axis": 2}, VOXEL)

    def grad(x):
        return (x[..., 1:] - x[..., :-1]).abs().mean()

    assert grad(low) < 0.7 * grad(sharp)


def test_motion_simulators_and_severity():
    rng = np.random.RandomState(0)
    for sim in sh.MOTION_SIMULATORS:
        p = sh.sample_motion_params(rng, [sim], severity=(2.0, 2.0))
        assert p["simulator"] == sim and p["level"] == pytest.approx(2.0)
    p = sh.sample_motion_params(rng, ["image"], severity=(3.0, 3.0))
    assert max(abs(v) for row in p["degrees"] for v in row) == pytest.approx(3.0)
    with pytest.raises(ValueError):
        sh.sample_motion_params(rng, ["nonsense"])


def test_unpair_batch_and_prepare_batch():
    batch = {
        "image": torch.arange(2 * 2 * 3 * 4 * 5, dtype=torch.float32).reshape(2, 2, 3, 4, 5),
        "label": torch.tensor([[0, 1], [0, 1]]),
    }
    flat = sh.unpair_batch(batch)
    assert flat["image"].shape == (4, 1, 3, 4, 5) and flat["label"].tolist() == [0, 1, 0, 1]
    assert torch.equal(flat["image"][1, 0], batch["image"][0, 1])
    x, y = sh.PairedPrepareBatch(torch.channels_last_3d)(batch, torch.device("cpu"))
    assert torch.equal(x, flat["image"]) and y.tolist() == [0, 1, 0, 1]


def test_make_synthetic_dataset(tmp_path):
    path = sh.make_synthetic_dataset(tmp_path / "set", n=4, seed=3, key="test", voxel_size=VOXEL, resampler="grid_sample")
    items = json.loads(path.read_text())["test"]
    assert len(items) == 4 and {it["label"] for it in items} <= {0, 1}
    for it in items:
        assert (tmp_path / "set" / it["image"]).is_file()
        assert (it["level"] > 0) == bool(it["label"])
    mtime = path.stat().st_mtime_ns
    assert sh.make_synthetic_dataset(tmp_path / "set", n=4, seed=3, key="test", voxel_size=VOXEL) == path
    assert path.stat().st_mtime_ns == mtime  # reused, not rewritten
    again = sh.make_synthetic_dataset(
        tmp_path / "again", n=4, seed=3, key="test", voxel_size=VOXEL, resampler="grid_sample"
    )
    assert json.loads(again.read_text())["test"] == items


def test_prepare_batch_never_puts_both_images_of_a_pair_in_one_pass():
    """BatchNorm must not compare a head's clean and moved image: pairs are split across passes."""
    pb = sh.PairedPrepareBatch(torch.channels_last_3d, seed=0)
    seen = []
    for t in range(20):
        # pair t of head t: clean = 10 t, moved = 10 t + 1 (one pair per call, as in configs/pretrain.yaml)
        img = torch.stack([torch.full((1, 2, 2, 2), 10.0 * t), torch.full((1, 2, 2, 2), 10.0 * t + 1)], 1)
        x, y = pb({"image": img, "label": torch.tensor([[0, 1]])}, torch.device("cpu"))
        heads = (x[:, 0, 0, 0, 0] // 10).tolist()
        if t > 0:
            assert len(heads) == len(set(heads)), f"call {t}: one head twice in a pass"
        assert torch.equal(y, (x[:, 0, 0, 0, 0] % 10).long())  # labels follow their images
        seen += x[:, 0, 0, 0, 0].tolist()
    assert sorted(seen) == sorted({v for v in seen}) and len(seen) == 2 * 20 - 1  # each image once (last held)
    labels_per_pass = set()
    pb2 = sh.PairedPrepareBatch(seed=1)
    for t in range(20):
        img = torch.stack([torch.zeros(1, 2, 2, 2), torch.ones(1, 2, 2, 2)], 1)
        _, y = pb2({"image": img, "label": torch.tensor([[0, 1]])})
        labels_per_pass.add(tuple(sorted(y.tolist())))
    assert {(0, 0), (1, 1), (0, 1)} <= labels_per_pass  # the label mix of a pass is random


def test_repeat_batches_mirrors_every_other_repeat():
    batches = [{"image": torch.arange(16.0).reshape(1, 2, 2, 2, 2) + 100 * i, "label": torch.tensor([[0, 1]])}
               for i in range(3)]
    out = list(sh.RepeatBatches(batches, repeats=3))
    assert len(sh.RepeatBatches(batches, repeats=3)) == len(out) == 9
    for i, batch in enumerate(batches):
        first, mirrored, again = out[3 * i: 3 * i + 3]
        assert first is batch and again is batch
        assert torch.equal(mirrored["image"], torch.flip(batch["image"], dims=(-3,)))
        assert torch.equal(mirrored["label"], batch["label"])  # a mirrored moved head is still moved
    with pytest.raises(ValueError, match="repeats"):
        sh.RepeatBatches(batches, repeats=0)
