"""The shared "is this a T1w brain in t1-linear space?" gate (scripts/preprocessing/quality.py):
motion never makes a brain refused; every kind of non-brain is."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import SMALL_SHAPE, SMALL_VOXEL

from scripts import synthetic_heads as sh
from scripts.common.grid import t1_linear_grid
from scripts.preprocessing.quality import BrainGate, brain_evidence, template_on_grid, template_similarity


@pytest.fixture(scope="module")
def head():
    """One synthetic head on the small grid: the generator, its object (before acquisition) and the clean image."""
    torch.set_num_threads(1)
    gen = sh.SyntheticHeadPaird(voxel_size=SMALL_VOXEL, resampler="grid_sample", anatomy_reuse=100)
    gen.set_random_state(seed=11)
    gen.randomize()
    (clean,) = gen.render(moved=False)
    obj, mask = sh.paint_head(gen._weights, gen.contrast)
    return gen, sh.apply_bias(obj, gen.acq), mask, clean.numpy()


def test_template_scores_one_and_constant_zero():
    template, mask, shell = template_on_grid(SMALL_SHAPE)
    assert template.shape == mask.shape == shell.shape == SMALL_SHAPE
    assert template_similarity(template) == pytest.approx(1.0, abs=1e-6)
    assert template_similarity(np.full(SMALL_SHAPE, 3.0, np.float32)) == 0.0
    ev = brain_evidence(template)
    assert ev.flipped_similarity < ev.similarity - 0.2 and ev.distinct_values == 64


@pytest.mark.parametrize("simulator", ["image", "kspace", "torchio"])
def test_moved_brains_of_every_severity_are_never_refused(head, simulator):
    gen, obj, mask, clean = head
    _, affine = t1_linear_grid(SMALL_VOXEL)
    gate = BrainGate()
    assert gate.check(clean)[0] == "ok"
    rng = np.random.RandomState(0)
    for severity in (0.5, 2.0, 8.0, 16.0):
        params = sh.sample_motion_params(rng, [simulator], (severity, severity))
        moved = sh.apply_acquisition(sh.apply_motion(obj, affine, params, "grid_sample"), mask, gen.acq, SMALL_VOXEL)
        verdict, reason, ev = gate.check(moved.numpy())
        assert verdict != "not_brain", (severity, reason)
        # the smoothed measure barely moves with motion (the voxel-wise one is what used to refuse moved heads)
        assert abs(ev.similarity - template_similarity(clean)) < 0.1


@pytest.mark.parametrize("kind", sorted(sh.NON_BRAINS))
def test_every_non_brain_kind_is_refused(head, kind):
    _, _, _, clean = head
    verdict, reason, _ = BrainGate().check(sh.make_non_brain(kind, clean, seed=3))
    assert verdict == "not_brain", (kind, reason)
    if kind == "upside_down":
        assert "upside down" in reason
    if kind == "label_map":
        assert "label map" in reason


def test_doubtful_band_and_thresholds(head):
    _, _, _, clean = head
    other = sh.make_non_brain("smooth_noise", clean, seed=1)
    sims = {}
    for alpha in np.linspace(0.0, 1.0, 21):  # blend a brain into noise: the measure falls monotonically
        sims[float(alpha)] = template_similarity(alpha * clean / clean.max() + (1 - alpha) * other / other.max())
    values = [sims[a] for a in sorted(sims)]
    assert values[0] < 0.2 and values[-1] > 0.6
    alpha = min(a for a, s in sims.items() if s >= 0.45)  # a blend in the doubtful band
    blend = alpha * clean / clean.max() + (1 - alpha) * other / other.max()
    sim = template_similarity(blend)
    verdict, reason, _ = BrainGate(refuse_below=sim - 0.02, doubt_below=sim + 0.02).check(blend)
    assert verdict == "doubtful" and "check that this is a T1w brain" in reason
    assert BrainGate(refuse_below=sim + 0.01, doubt_below=sim + 0.02).check(blend)[0] == "not_brain"
    assert BrainGate(refuse_below=sim - 0.02, doubt_below=sim - 0.01).check(blend)[0] == "ok"


def test_non_brain_kinds_are_validated(head):
    with pytest.raises(ValueError, match="unknown non-brain kind"):
        sh.make_non_brain("teapot", head[3])


def test_coarse_smoothing_at_1mm_equals_full_resolution_smoothing():
    """At 1 mm the measure smooths on the 2 mm sub-grid (5x faster); it must agree with smoothing at 1 mm."""
    from scipy import ndimage

    from scripts.preprocessing import quality

    template, mask, _ = template_on_grid((169, 208, 179))
    rng = np.random.RandomState(0)
    cases = [template + rng.normal(0, 0.3 * template.std(), template.shape).astype(np.float32),  # noisy brain
             np.roll(template, 25, axis=2), template[:, ::-1, :].copy()]  # shifted, back to front
    for image in cases:
        smooth_t = ndimage.gaussian_filter(template, quality.SIGMA_MM)[mask]
        smooth_i = ndimage.gaussian_filter(image, quality.SIGMA_MM)[mask]
        full = np.corrcoef(smooth_t, smooth_i)[0, 1]
        assert quality._smooth(image, quality.SIGMA_MM).shape == (85, 104, 90)
        assert template_similarity(image) == pytest.approx(full, abs=0.005)
