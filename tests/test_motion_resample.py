"""Tests of scripts/motion/resample.py: rigid maps, Euler convention, resampling back-ends."""

import numpy as np
import SimpleITK as sitk
import torch

from scripts.motion.resample import dft_matrices, euler_to_matrix, resample_rigid, rigid_index_map, voxel_spacing


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


def test_backends_agree():
    torch.manual_seed(0)
    vol = torch.rand(2, 14, 16, 13)
    a, b = _random_map()
    ref = resample_rigid(vol, a, b, fill=-1.0, backend="eager")
    for backend in ("grid_sample", "compiled"):
        out = resample_rigid(vol, a, b, fill=-1.0, backend=backend)
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)
    assert (ref == -1.0).any() and (ref != -1.0).any()


def test_integer_shift_is_exact_with_fill():
    vol = torch.rand(1, 10, 12, 9)
    out = resample_rigid(vol, torch.eye(3), torch.tensor([2.0, 0.0, -1.0]), fill=-5.0, backend="grid_sample")
    expected = torch.full_like(vol, -5.0)
    expected[:, :8, :, 1:] = vol[:, 2:, :, :8]
    torch.testing.assert_close(out, expected)


def test_identity_map_returns_input():
    vol = torch.rand(1, 9, 8, 7, dtype=torch.float64)
    out = resample_rigid(vol, torch.eye(3), torch.zeros(3), backend="eager")
    torch.testing.assert_close(out, vol)


def test_dft_matrices_match_fft():
    x = torch.rand(5, 17, dtype=torch.float64)
    freqs = torch.arange(-8, 9)
    cos, sin = dft_matrices(17, freqs, "cpu", torch.float64)
    spec = torch.fft.fft(x, dim=-1)[:, freqs % 17]
    torch.testing.assert_close(x @ cos, spec.real)
    torch.testing.assert_close(-(x @ sin), spec.imag)


def test_auto_backend_never_compiles_inside_dataloader_workers():
    """torch.compile deadlocks after fork: in a DataLoader worker "auto" must use grid_sample."""
    from unittest import mock

    from scripts.motion import resample as rs

    vol = torch.rand(1, 6, 7, 8)
    eye, zero = torch.eye(3), torch.zeros(3)
    with mock.patch.object(rs, "_compiled_backend", side_effect=AssertionError("compiled in a worker")), \
            mock.patch("torch.utils.data.get_worker_info", return_value=object()):
        out = rs.resample_rigid(vol, eye, zero, backend="auto")
    assert torch.allclose(out, vol, atol=1e-5)
