"""Tests of scripts/motion/batch.py: batched motion equals per-sample motion, labels, seeding."""

import torch
from monai.data import MetaTensor

from scripts.motion.batch import MotionPrepareBatch
from scripts.motion.image_motion import apply_image_motion
from scripts.motion.kspace_motion import apply_kspace_motion


def _batch(n=4):
    g = torch.Generator().manual_seed(0)
    img = torch.zeros(n, 1, 20, 22, 18)
    img[..., 4:-4, 4:-4, 4:-4] = torch.rand(n, 1, 12, 14, 10, generator=g) + 1
    return {"image": MetaTensor(img, affine=torch.eye(4)), "label": torch.zeros(n, dtype=torch.long)}


def test_image_batch_equals_per_sample_and_labels():
    batch = _batch()
    prep = MotionPrepareBatch("image", prob=0.5, seed=1, severity="severe", resampler="grid_sample")
    images, labels = prep(batch, torch.device("cpu"))
    assert 0 < len(prep.last_selected) < 4
    assert labels.tolist() == [int(i in prep.last_selected) for i in range(4)]
    assert images.shape == batch["image"].shape and images.dtype == torch.float32
    for i in range(4):
        if i in prep.last_selected:
            p = prep.last_params[prep.last_selected.index(i)]
            ref = apply_image_motion(batch["image"][i].as_tensor(), torch.eye(4), p["degrees"], p["translation"],
                                     p["times"], resampler="grid_sample")
            torch.testing.assert_close(images[i].as_tensor(), ref)
        else:
            torch.testing.assert_close(images[i], batch["image"][i])
    assert batch["label"].sum() == 0  # the input batch is not modified


def test_kspace_batch_seeded():
    batch = _batch(3)
    a = MotionPrepareBatch("kspace", prob=1.0, seed=5, n_t=40, resampler="eager")(batch, "cpu")
    prep = MotionPrepareBatch("kspace", prob=1.0, seed=5, n_t=40, resampler="eager")
    b = prep(batch, "cpu")
    torch.testing.assert_close(a[0], b[0])
    assert b[1].tolist() == [1, 1, 1]
    ref = apply_kspace_motion(batch["image"][2].as_tensor(), torch.eye(4), prep.last_params[2]["course"],
                              resampler="eager")
    torch.testing.assert_close(b[0][2].as_tensor(), ref)
