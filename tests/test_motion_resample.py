"""Tests of scripts/motion/resample.py: rigid maps, Euler convention, resamplers."""

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from scripts.motion.resample import _block_edge, dft_matrices, euler_to_matrix, resample_rigid, rigid_index_map, voxel_spacing


def test_euler_matches_simpleitk():
    angles = [0.3, -0.2, 0.5]
    tr = sitk.Euler3DTransform()
    tr.SetRotation(*angles)
    ref = np.array(tr.GetMatrix()).reshape(3, 3)
    ours = euler_to_matrix(torch.tensor(np.degrees(angles)))
    np.testing.assert_allclose(ours.numpy(), ref, atol=1e-6)


def test_rigid_index_map_identity_affine():
    rot = euler_to_matrix(torch.tensor([0.0, 0.0, 90.0]))
    a, b = rigid_index_map(torch.eye(4), rot, torch.tensor([1.0, 2.0, 3.0]), torch.tensor([5.0, 5.0, 5.0]))
    u = torch.tensor([7.0, 5.0, 5.0], dtype=torch.float64)
    # R (u - c) + c + t with R = 90 deg about z: (2, 0, 0) -> (0, 2, 0)
    np.testing.assert_allclose((a @ u + b).numpy(), [6.0, 9.0, 8.0], atol=1e-9)


def test_voxel_spacing():
    aff = torch.diag(torch.tensor([2.0, -1.5, 3.0, 1.0]))
    np.testing.assert_allclose(voxel_spacing(aff).numpy(), [2.0, 1.5, 3.0])


def _random_map():
    rot = euler_to_matrix(torch.tensor([[6.0, -3.0, 4.0], [0.0, 2.0, -9.0]]))
    return rigid_index_map(torch.eye(4), rot, torch.tensor([[1.3, -2.0, 0.6], [-0.4, 0.0, 2.2]]),
                           torch.tensor([7.0, 8.0, 6.5]))


def test_resamplers_agree():
    torch.manual_seed(0)
    vol = torch.rand(2, 14, 16, 13)
    a, b = _random_map()
    ref = resample_rigid(vol, a, b, fill=-1.0, resampler="eager")
    for resampler in ("grid_sample", "compiled"):
        out = resample_rigid(vol, a, b, fill=-1.0, resampler=resampler)
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)
    assert (ref == -1.0).any() and (ref != -1.0).any()


@pytest.mark.parametrize("resampler", ["eager", "grid_sample", "compiled"])
def test_subtract_returns_moved_minus_input(resampler):
    torch.manual_seed(1)
    vol = torch.rand(1, 17, 9, 21)  # no axis a multiple of the compiled kernel's blocks
    a, b = _random_map()
    ref = resample_rigid(vol, a[0], b[0], fill=-1.0, resampler="eager")
    out = resample_rigid(vol, a[0], b[0], fill=-1.0, resampler=resampler, subtract=True)
    torch.testing.assert_close(out, ref - vol, atol=1e-5, rtol=0)


def test_block_edges_pad_least():
    assert (_block_edge(169), _block_edge(208), _block_edge(96), _block_edge(5)) == (13, 16, 16, 8)
    assert -(-179 // _block_edge(179)) * _block_edge(179) == 180


def test_non_finite_map_is_refused():
    vol = torch.rand(1, 6, 6, 6)
    with pytest.raises(ValueError, match="finite"):
        resample_rigid(vol, torch.full((3, 3), float("nan")), torch.zeros(3), resampler="compiled")


def test_integer_shift_is_exact_with_fill():
    vol = torch.rand(1, 10, 12, 9)
    out = resample_rigid(vol, torch.eye(3), torch.tensor([2.0, 0.0, -1.0]), fill=-5.0, resampler="grid_sample")
    expected = torch.full_like(vol, -5.0)
    expected[:, :8, :, 1:] = vol[:, 2:, :, :8]
    torch.testing.assert_close(out, expected)


def test_identity_map_returns_input():
    vol = torch.rand(1, 9, 8, 7, dtype=torch.float64)
    out = resample_rigid(vol, torch.eye(3), torch.zeros(3), resampler="eager")
    torch.testing.assert_close(out, vol)


def test_dft_matrices_match_fft():
    x = torch.rand(5, 17, dtype=torch.float64)
    freqs = torch.arange(-8, 9)
    cos, sin = dft_matrices(17, freqs, "cpu", torch.float64)
    spec = torch.fft.fft(x, dim=-1)[:, freqs % 17]
    torch.testing.assert_close(x @ cos, spec.real)
    torch.testing.assert_close(-(x @ sin), spec.imag)


class _Resampled(torch.utils.data.Dataset):
    def __len__(self) -> int:
        return 2

    def __getitem__(self, i: int) -> torch.Tensor:
        from scripts.motion.resample import resample_rigid

        vol = torch.arange(6 * 7 * 8, dtype=torch.float32).reshape(1, 6, 7, 8)
        return resample_rigid(vol, torch.eye(3), torch.tensor([0.5, 0.0, 0.0]), resampler="auto")[0]


def test_compiled_resampler_runs_in_forked_dataloader_workers():
    """The parent compiles first, then forked workers must not hang waiting on its compile pool."""
    vol = torch.arange(6 * 7 * 8, dtype=torch.float32).reshape(1, 6, 7, 8)
    parent = resample_rigid(vol, torch.eye(3), torch.tensor([0.5, 0.0, 0.0]), resampler="auto")
    loader = torch.utils.data.DataLoader(_Resampled(), batch_size=1, num_workers=2, timeout=240)
    for out in loader:
        assert torch.allclose(out, parent, atol=1e-5)
