"""Tests of scripts/motion/image_motion.py: exactness, TorchIO equivalence, transforms."""

import numpy as np
import pytest
import torch
import torchio as tio
from monai.data import DataLoader, Dataset, MetaTensor

from scripts.motion.image_motion import (
    ImageMotion,
    RandImageMotion,
    RandImageMotiond,
    apply_image_motion,
    image_motion_course,
    segment_layout,
)
from scripts.motion.resample import resample_rigid

AFF = torch.tensor([[1.0, 0, 0, -20], [0, 1, 0, -30], [0, 0, 1, -15], [0, 0, 0, 1]], dtype=torch.float64)
DEG = torch.tensor([[3.0, -2, 5], [1, 4, -3], [-2, 2, 2], [5, 1, -1]])
TRANS = torch.tensor([[2.0, -1, 3], [1, 2, -2], [-3, 1, 1], [0.5, -2, 1]])
TIMES = torch.tensor([0.18, 0.42, 0.63, 0.81])


def _phantom(shape=(32, 36, 30), seed=0):
    g = torch.Generator().manual_seed(seed)
    v = torch.zeros(1, *shape)
    v[:, 6:-6, 7:-7, 5:-5] = torch.rand(1, shape[0] - 12, shape[1] - 14, shape[2] - 10, generator=g) + 1
    return v


def _naive(vol, moved_by_row, times, axis, output):
    """Full-FFT stitching exactly as described in METHOD.md section 3.1 (reference)."""
    length = vol.shape[axis]
    bounds, source = segment_layout(times, length)
    spectra = {-1: torch.fft.fftshift(torch.fft.fftn(vol.double()))}
    spectra |= {r: torch.fft.fftshift(torch.fft.fftn(m.double())) for r, m in moved_by_row.items()}
    out = torch.empty_like(spectra[-1])
    for s, row in enumerate(source):
        sl = [slice(None)] * 3
        sl[axis] = slice(bounds[s], bounds[s + 1])
        out[tuple(sl)] = spectra[row][tuple(sl)]
    img = torch.fft.ifftn(torch.fft.ifftshift(out))
    return (img.real if output == "real" else img.abs()).float()


def test_segment_layout_swaps_identity_to_centre():
    bounds, source = segment_layout(torch.tensor([0.2, 0.4, 0.6, 0.8]), 179)
    assert bounds == [0, 35, 71, 107, 143, 179]
    assert source == [1, 0, -1, 2, 3]  # segment 2 (holding the centre, index 89) is unmoved


def test_zero_motion_returns_input():
    v = _phantom()
    out = apply_image_motion(v, AFF, torch.zeros(4, 3), torch.zeros(4, 3), TIMES, resampler="grid_sample")
    torch.testing.assert_close(out, v, atol=1e-5, rtol=0)


def test_pure_translation_segments_use_exactly_shifted_image():
    """Integer translations in every moved segment: the stitched spectrum is the exact shift's."""
    v = _phantom()
    times = torch.tensor([0.3, 0.45, 0.55, 0.7])
    trans = torch.tensor([[2.0, -3.0, 1.0]]).repeat(4, 1)  # LPS mm; pull-back u_in = u + (-2, 3, 1)
    out = apply_image_motion(v, AFF, torch.zeros(4, 3), trans, times, center="world_origin", resampler="compiled")
    shifted = torch.full_like(v[0], float(v.min()))
    shifted[2:, :-3, :-1] = v[0, :-2, 3:, 1:]
    expected = _naive(v[0], dict.fromkeys(range(4), shifted), times, 2, "real")
    torch.testing.assert_close(out[0], expected, atol=1e-4, rtol=0)


def test_one_segment_translation_integer_shift():
    """A single moved segment by an integer shift: its k-space slab is the shifted image's spectrum."""
    v = _phantom()
    times = torch.tensor([0.7])  # N = 1: segment 0 = unmoved (contains the centre), segment 1 moved
    trans = torch.tensor([[0.0, 0.0, 3.0]])
    out = apply_image_motion(v, AFF, torch.zeros(1, 3), trans, times, output="magnitude", resampler="eager")
    shifted = torch.full_like(v, float(v.min()))
    shifted[..., :-3] = v[..., 3:]  # pull-back u_in = u + 3 along z
    expected = _naive(v[0], {0: shifted[0]}, times, 2, "magnitude")
    torch.testing.assert_close(out[0], expected, atol=1e-4, rtol=0)


@pytest.mark.parametrize("axis", [0, 1, 2])
@pytest.mark.parametrize("output", ["real", "magnitude"])
@pytest.mark.parametrize("order", ["C", "F"])
def test_slab_dft_equals_full_fft_stitching(axis, output, order):
    """Every phase axis, both outputs, C- and Fortran-ordered input (the phase axis then lies
    innermost, outermost or in the middle of memory: the three code paths)."""
    v = _phantom()
    times = torch.tensor([0.2, 0.49, 0.5, 0.9])  # includes an empty and a centre-straddling segment
    from scripts.motion.image_motion import _index_maps

    a, b = _index_maps(AFF, v.shape[1:], DEG, TRANS, "image")
    moved = {r: resample_rigid(v, a[r], b[r], v.min(), "eager")[0] for r in range(4)}
    inp = v if order == "C" else v.permute(0, 3, 2, 1).contiguous().permute(0, 3, 2, 1)  # as nibabel loads
    ours = apply_image_motion(inp, AFF, DEG, TRANS, times, phase_axis=axis, output=output, resampler="eager")
    assert ours.stride() == inp.stride()  # the memory layout is kept
    torch.testing.assert_close(ours[0], _naive(v[0], moved, times, axis, output), atol=2e-4, rtol=0)


def test_compiled_resampler_equals_eager_on_fortran_input():
    v = _phantom((29, 34, 27)).permute(0, 3, 2, 1).contiguous().permute(0, 3, 2, 1)
    ref = apply_image_motion(v, AFF, DEG, TRANS, TIMES, phase_axis=1, resampler="eager")
    out = apply_image_motion(v, AFF, DEG, TRANS, TIMES, phase_axis=1, resampler="compiled")
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=0)


def test_parseval_energy():
    """Output energy equals the stitched spectrum energy (Parseval), magnitude output."""
    v = _phantom()
    out = apply_image_motion(v, AFF, DEG, TRANS, TIMES, output="magnitude", resampler="eager")
    from scripts.motion.image_motion import _index_maps

    a, b = _index_maps(AFF, v.shape[1:], DEG, TRANS, "image")
    bounds, source = segment_layout(TIMES, v.shape[3])
    energy = 0.0
    for s, row in enumerate(source):
        img = v[0] if row < 0 else resample_rigid(v, a[row], b[row], v.min(), "eager")[0]
        spec = torch.fft.fftshift(torch.fft.fftn(img.double()))
        energy += float(spec[..., bounds[s] : bounds[s + 1]].abs().pow(2).sum()) / v[0].numel()
    assert float(out.double().pow(2).sum()) == pytest.approx(energy, rel=1e-5)


def test_matches_torchio_for_same_parameters():
    v = _phantom((40, 48, 44))
    subject = tio.Subject(image=tio.ScalarImage(tensor=v, affine=AFF.numpy()))
    motion = tio.Motion(degrees={"image": DEG.numpy()}, translation={"image": TRANS.numpy()},
                        times={"image": TIMES.numpy()}, image_interpolation={"image": "linear"})
    ref = motion(subject)["image"].data
    ours = apply_image_motion(v, AFF, DEG, TRANS, TIMES, center="world_origin", resampler="grid_sample")
    assert (ref - v).abs().max() > 0.5  # the motion is visible
    torch.testing.assert_close(ours, ref, atol=1e-4, rtol=0)  # documented tolerance


def test_transform_preserves_type_dtype_meta_and_reproducible():
    img = MetaTensor(_phantom(), affine=AFF.float())
    t = RandImageMotion(prob=1.0, degrees=(2, 8), translation=(2, 8), num_transforms=4, resampler="grid_sample")
    t.set_random_state(3)
    a = t(img)
    assert isinstance(a, MetaTensor) and a.shape == img.shape and a.dtype == torch.float32
    torch.testing.assert_close(a.affine, img.affine)
    t.set_random_state(3)
    torch.testing.assert_close(t(img), a)
    assert not torch.allclose(t(img), a)
    core = ImageMotion(t.last_params()["degrees"], t.last_params()["translation"], t.last_params()["times"],
                       resampler="grid_sample")
    torch.testing.assert_close(core(img), t(img, randomize=False))
    t0 = RandImageMotion(prob=0.0)
    assert t0(img) is img
    with pytest.raises(ValueError, match="severity"):
        RandImageMotion(severity="extreme")


def test_dict_transform_label_params_metrics_collate():
    data = [{"image": MetaTensor(_phantom(seed=i), affine=AFF.float()), "label": 0} for i in range(6)]
    t = RandImageMotiond(keys="image", label_key="label", prob=0.5, params_key="motion_params",
                         metrics_key="motion_metrics", severity="moderate", resampler="grid_sample")
    t.set_random_state(2)
    out = [t(d) for d in data]
    applied = [bool(o["motion_params"]["applied"]) for o in out]
    assert any(applied) and not all(applied)
    for o, d, ap in zip(out, data, applied):
        assert o["label"] == int(ap)
        assert o["motion_metrics"]["ssim"] < 1.0 if ap else o["motion_metrics"]["ssim"] == 1.0
        if not ap:
            assert o["image"] is d["image"]
    batch = next(iter(DataLoader(Dataset(data, transform=t), batch_size=6)))
    assert batch["motion_params"]["degrees"].shape == (6, 4, 3)
    assert batch["motion_metrics"]["mean_disp_jenkinson"].shape == (6,)
    assert batch["label"].shape == (6,)


def test_course_for_metrics():
    course = image_motion_course(DEG, TRANS, torch.tensor([0.2, 0.4, 0.6, 0.8]), 10)
    assert course.shape == (6, 10)
    assert torch.all(course[:, 4:6] == 0)  # the unmoved centre segment
    torch.testing.assert_close(course[3:, 0], DEG[1].double())
