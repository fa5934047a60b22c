"""Domain-randomised synthetic T1w heads in t1-linear space, made to teach motion and nothing else.

The shipped detector is pre-trained only on images made here from the MNI ICBM152 2009 template that
the nilearn wheel ships (T1, grey and white matter maps, brain mask; nothing is downloaded). In the
spirit of SynthSeg's domain randomisation, every draw changes what a motion detector must ignore:

* **anatomy**: head size and pose (the residual of an affine registration), a smooth random
  deformation, enlarged or shrunk ventricles, cortical atrophy (grey matter traded for CSF);
* **extra-cerebral tissues built procedurally** from the distance to the brain: subarachnoid CSF,
  dura, the skull's inner table, diploe and outer table, muscle, fat and skin with random,
  spatially varying thicknesses; a neck below the skull base, eyes with orbital fat, air sinuses;
* **contrast**: one intensity per tissue in T1w order (WM > GM > CSF, fat bright, bone dark) with
  widely varied ratios, sometimes fully random brain ratios, a gamma curve, tissue texture, and a
  gadolinium mode (bright dura, sinus and cortical vessels);
* **acquisition**: bias field, thick slices brought back to 1 mm, Gibbs ringing, mild pulsation
  ghosts (labelled clean), Rician noise with or without a g-factor map, background with or without
  noise, the field of view cut at the top or bottom, scanner gain and integer storage.

Sampling is separated from rendering (TorchIO 2's habit): ``sample_*`` functions draw plain
parameter dictionaries from a ``numpy.random.RandomState``; ``render_head``, ``apply_acquisition``
and ``apply_motion`` are deterministic given them. :class:`SyntheticHeadPaird` makes a **pair** from
one draw: the same head through the same acquisition (same noise realisation) once without and once
with motion, so the two classes differ in motion and in nothing else. Motion acts on the object
(after the bias field, before the acquisition chain), with a random simulator (the image-based and
k-space simulators of :mod:`scripts.motion`, or TorchIO's), phase-encoding axis and severity.

Held-out regimes (:data:`REGIMES`) shift anatomy or contrast outside the training ranges for the
generalisation benchmark (``tests/benchmarks/bench_generalisation.py``).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from monai.data import MetaTensor
from monai.transforms import MapTransform, RandomizableTransform

from scripts.common.files import write_nifti
from scripts.common.grid import T1_LINEAR_ORIGIN, grid_voxel, t1_linear_grid

__all__ = [
    "REGIMES",
    "MOTION_SIMULATORS",
    "NUISANCES",
    "TISSUES",
    "template_tissues",
    "sample_anatomy_params",
    "sample_contrast_params",
    "sample_head_params",
    "render_anatomy",
    "paint_head",
    "render_head",
    "sample_acquisition_params",
    "apply_acquisition",
    "apply_bias",
    "sample_motion_params",
    "apply_motion",
    "SyntheticHeadPaird",
    "SyntheticHeadd",
    "RepeatBatches",
    "NON_BRAINS",
    "make_non_brain",
    "synthetic_items",
    "unpair_batch",
]

#: Parameter ranges; each entry is ``(low, high)`` of a uniform draw unless noted. ``train`` is what
#: the shipped weights saw; the other regimes move one group of ranges outside it (held out).
_TRAIN: dict[str, Any] = {
    # anatomy and pose
    "head_scale": (0.92, 1.08),  # per axis
    "rotation_deg": (-4.0, 4.0),  # residual of the affine registration, per axis
    "shift_mm": (-3.0, 3.0),
    "warp_mm": (0.0, 2.5),  # SD of a smooth displacement field
    "ventricle": (-0.15, 0.3),  # radial enlargement around the lateral ventricles
    "atrophy": (0.0, 0.35),  # fraction of grey matter turned into CSF
    # extra-cerebral layers (mm)
    "csf_mm": (1.0, 4.5),
    "skull_mm": (4.0, 10.0),
    "diploe_fraction": (0.3, 0.6),
    "muscle_mm": (0.5, 3.0),
    "fat_mm": (1.0, 5.0),
    "skin_mm": (1.0, 2.5),
    "thickness_variation": (0.0, 0.3),
    "neck_z": (-45.0, -20.0),
    # contrast, relative to white matter = 1
    "gm_wm": (0.55, 0.85),
    "csf_wm": (0.05, 0.4),
    "random_contrast_prob": 0.15,
    "gado_prob": 0.25,
    "gamma_log_sd": 0.2,
    "texture_sd": (0.0, 0.08),
}

REGIMES: dict[str, dict[str, Any]] = {
    "train": _TRAIN,
    # anatomy outside the training ranges: small/large heads, big ventricles, strong atrophy, thick CSF
    "anatomy_heldout": _TRAIN
    | {
        "head_scale": (0.86, 1.14),
        "ventricle": (0.3, 0.45),
        "atrophy": (0.35, 0.55),
        "csf_mm": (4.5, 7.0),
        "warp_mm": (2.5, 4.0),
    },
    # contrast outside the training ranges: flat grey/white contrast (1.5 T-like, post-gadolinium), bright CSF
    "contrast_heldout": _TRAIN
    | {"gm_wm": (0.86, 0.93), "csf_wm": (0.4, 0.55), "random_contrast_prob": 0.0, "gamma_log_sd": 0.35},
}

#: Acquisition nuisances: (probability, parameter range). ``apply_acquisition`` runs them in this order.
_ACQUISITION: dict[str, Any] = {
    "bias_sd": (0.0, 0.35),
    "lowres_prob": 0.25,
    "lowres_mm": (1.5, 5.0),
    "gibbs_prob": 0.3,
    "gibbs_keep": (0.55, 0.9),
    "ghost_prob": 0.1,
    "ghost_intensity": (0.01, 0.05),
    "noise_sd": (0.005, 0.06),
    "high_noise_prob": 0.1,
    "high_noise_sd": (0.06, 0.12),
    "gfactor_prob": 0.3,
    "zero_background_prob": 0.2,
    "fov_cut_prob": 0.15,
    "fov_cut_mm": (5.0, 35.0),
}

#: One nuisance alone, strong, for the false-positive table of the generalisation benchmark.
NUISANCES: dict[str, dict[str, Any]] = {
    "none": {},
    "noise": {"noise_sd": (0.1, 0.12)},
    "bias": {"bias_sd": (0.45, 0.5)},
    "gibbs": {"gibbs_prob": 1.0, "gibbs_keep": (0.5, 0.6)},
    "low_resolution": {"lowres_prob": 1.0, "lowres_mm": (4.0, 6.0)},
    "fov_cut": {"fov_cut_prob": 1.0, "fov_cut_mm": (25.0, 40.0)},
    "ghosts": {"ghost_prob": 1.0, "ghost_intensity": (0.04, 0.06)},
}
_NUISANCE_OFF: dict[str, Any] = {
    "bias_sd": (0.0, 0.0),
    "lowres_prob": 0.0,
    "gibbs_prob": 0.0,
    "ghost_prob": 0.0,
    "noise_sd": (0.01, 0.01),
    "high_noise_prob": 0.0,
    "gfactor_prob": 0.0,
    "zero_background_prob": 0.0,
    "fov_cut_prob": 0.0,
}

#: Motion simulators and the default training mixture (TorchIO's is held out of training).
MOTION_SIMULATORS = ("image", "kspace", "torchio")
_HEAD_CENTRE = (0.0, -18.0, 10.0)  # mm, rotation and scaling centre of the head
_VENTRICLE_CENTRE = (0.0, -12.0, 14.0)


def _uniform(rng: np.random.RandomState, bounds: Sequence[float], size: Any = None) -> Any:
    return rng.uniform(float(bounds[0]), float(bounds[1]), size=size)


@functools.lru_cache(maxsize=1)
def template_tissues() -> tuple[torch.Tensor, np.ndarray]:
    """Template-space ``(4, X, Y, Z)`` float32 tensor: WM, GM, CSF, signed distance to the brain (mm).

    CSF is what the brain mask holds beyond grey and white matter (nilearn ships no CSF map); the
    distance is negative inside the mask and clipped to [-10, 60] mm. Returns it with the affine.
    """
    from nilearn import datasets  # heavy import, only when generating
    from scipy import ndimage

    t1_img = datasets.load_mni152_template(resolution=1)
    gm = np.asarray(datasets.load_mni152_gm_template(resolution=1).get_fdata(), dtype=np.float32)
    wm = np.asarray(datasets.load_mni152_wm_template(resolution=1).get_fdata(), dtype=np.float32)
    brain = np.asarray(datasets.load_mni152_brain_mask(resolution=1).get_fdata(), dtype=np.float32) > 0.5
    csf = np.clip(brain.astype(np.float32) - gm - wm, 0.0, 1.0)
    outside = ndimage.distance_transform_edt(~brain)
    inside = ndimage.distance_transform_edt(brain)
    dist = np.clip(np.where(brain, 0.5 - inside, outside - 0.5), -10.0, 60.0).astype(np.float32)
    return torch.from_numpy(np.stack([wm, gm, csf, dist])), t1_img.affine


@functools.lru_cache(maxsize=4)
def _world_grid(voxel_size: float) -> torch.Tensor:
    """World coordinates (mm, RAS) of the t1-linear voxels, ``(X, Y, Z, 3)``."""
    shape, _ = t1_linear_grid(voxel_size)
    axes = [torch.arange(n, dtype=torch.float32) * voxel_size + o for n, o in zip(shape, T1_LINEAR_ORIGIN)]
    return torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1)


def _smooth(gen: torch.Generator, shape: Sequence[int], coarse: Sequence[int], channels: int = 1) -> torch.Tensor:
    """Unit-SD Gaussian noise on a coarse grid, upsampled trilinearly to ``shape``: ``(channels, *shape)``."""
    noise = torch.randn((1, channels, *[max(2, int(c)) for c in coarse]), generator=gen)
    return F.interpolate(noise, size=tuple(shape), mode="trilinear", align_corners=True)[0]


def _rotation(degrees: Sequence[float]) -> torch.Tensor:
    rx, ry, rz = (math.radians(float(d)) for d in degrees)
    cx, sx, cy, sy, cz, sz = math.cos(rx), math.sin(rx), math.cos(ry), math.sin(ry), math.cos(rz), math.sin(rz)
    mx = torch.tensor([[1, 0, 0], [0, cx, -sx], [0, sx, cx]], dtype=torch.float32)
    my = torch.tensor([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]], dtype=torch.float32)
    mz = torch.tensor([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]], dtype=torch.float32)
    return mz @ my @ mx


#: Tissue classes of a rendered anatomy, in the order of its weight channels.
TISSUES = (
    "background",
    "muscle",
    "fat",
    "skin",
    "marrow",
    "bone",
    "dura",
    "csf",
    "sinus_air",
    "vitreous",
    "wm",
    "gm",
    "sagittal_sinus",
    "cortical_vessel",
)


def sample_anatomy_params(rng: np.random.RandomState, regime: str | Mapping[str, Any] = "train") -> dict[str, Any]:
    """Draw one head's anatomy and extra-cerebral layers as a dictionary of plain numbers.

    ``regime`` is a name of :data:`REGIMES` or a mapping of the same keys.
    """
    r = REGIMES[regime] if isinstance(regime, str) else regime
    return {
        "seed": int(rng.randint(0, 2**31 - 1)),
        "head_scale": _uniform(rng, r["head_scale"], 3).tolist(),
        "rotation_deg": _uniform(rng, r["rotation_deg"], 3).tolist(),
        "shift_mm": _uniform(rng, r["shift_mm"], 3).tolist(),
        "warp_mm": float(_uniform(rng, r["warp_mm"])),
        "ventricle": float(_uniform(rng, r["ventricle"])),
        "atrophy": float(_uniform(rng, r["atrophy"])),
        "csf_mm": float(_uniform(rng, r["csf_mm"])),
        "skull_mm": float(_uniform(rng, r["skull_mm"])),
        "diploe_fraction": float(_uniform(rng, r["diploe_fraction"])),
        "muscle_mm": float(_uniform(rng, r["muscle_mm"])),
        "fat_mm": float(_uniform(rng, r["fat_mm"])),
        "skin_mm": float(_uniform(rng, r["skin_mm"])),
        "thickness_variation": float(_uniform(rng, r["thickness_variation"])),
        "neck_z": float(_uniform(rng, r["neck_z"])),
        "neck_radii": _uniform(rng, (48.0, 66.0), 2).tolist(),
        "eye_centre": [
            float(_uniform(rng, (29.0, 35.0))),
            float(_uniform(rng, (52.0, 62.0))),
            float(_uniform(rng, (-42.0, -32.0))),
        ],
        "eye_radius": float(_uniform(rng, (10.5, 12.5))),
    }


def sample_contrast_params(rng: np.random.RandomState, regime: str | Mapping[str, Any] = "train") -> dict[str, Any]:
    """Draw one T1w contrast: an intensity per tissue of :data:`TISSUES` (white matter 1), gamma, texture."""
    r = REGIMES[regime] if isinstance(regime, str) else regime
    gado = bool(rng.uniform() < r["gado_prob"])
    if rng.uniform() < r["random_contrast_prob"]:  # fully random brain ratios, T1w order kept
        csf, gm = sorted(rng.uniform(0.0, 0.97, size=2))
    else:
        gm, csf = _uniform(rng, r["gm_wm"]), _uniform(rng, r["csf_wm"])
    v = {"background": 0.0, "wm": 1.0, "gm": float(gm), "csf": float(csf)}
    v |= {
        "dura": float(_uniform(rng, (0.8, 1.3) if gado else (0.1, 0.5))),
        "bone": float(_uniform(rng, (0.0, 0.12))),
        "marrow": float(_uniform(rng, (0.5, 1.2))),
        "muscle": float(_uniform(rng, (0.3, 0.6))),
        "fat": float(_uniform(rng, (0.9, 1.4))),
        "skin": float(_uniform(rng, (0.4, 0.8))),
        "vitreous": float(v["csf"] * _uniform(rng, (0.7, 1.2))),
        "sinus_air": float(_uniform(rng, (0.0, 0.03))),
    }
    vessel = float(_uniform(rng, (0.9, 1.5)))
    v["sagittal_sinus"] = vessel if gado else v["dura"]
    v["cortical_vessel"] = vessel if gado else v["csf"]
    return {
        "seed": int(rng.randint(0, 2**31 - 1)),
        "gado": gado,
        "values": v,
        "gamma": float(math.exp(rng.normal(0.0, r["gamma_log_sd"]))),
        "texture_sd": float(_uniform(rng, r["texture_sd"])),
    }


def sample_head_params(rng: np.random.RandomState, regime: str | Mapping[str, Any] = "train") -> dict[str, Any]:
    """Draw a whole head: ``{"anatomy": ..., "contrast": ...}``."""
    return {"anatomy": sample_anatomy_params(rng, regime), "contrast": sample_contrast_params(rng, regime)}


def _band(d: torch.Tensor, lo: torch.Tensor | float, hi: torch.Tensor | float, width: float) -> torch.Tensor:
    """Soft membership of ``lo < d < hi`` (edges ``width`` mm wide)."""
    return torch.sigmoid((d - lo) / width).mul_(torch.sigmoid((hi - d) / width))


def _pad_spec(shape: Sequence[int], covered: Sequence[int]) -> list[int]:
    """``F.pad`` widths (last axis first) that extend ``covered`` to ``shape`` at the high end."""
    spec: list[int] = []
    for full, part in zip(reversed(list(shape)), reversed(list(covered))):
        spec += [0, int(full) - int(part)]
    return spec


class _Layers:
    """Soft tissue weights built by laying tissues over each other (each new layer covers what is below).

    Layers are composited from the top down once all are known (two passes over the volume per
    layer, whatever the number of tissues); what no layer covers is background.
    """

    def __init__(self) -> None:
        self.stack: list[tuple[dict[str, Any], torch.Tensor]] = []

    def lay(self, tissue: str | Mapping[str, Any], weight: torch.Tensor) -> None:
        """Lay ``tissue`` (a name, or a mapping name -> fraction of the layer) with opacity ``weight``."""
        self.stack.append(({tissue: 1.0} if isinstance(tissue, str) else dict(tissue), weight.clamp_(0.0, 1.0)))

    def composite(self) -> torch.Tensor:
        shape = self.stack[0][1].shape
        out = torch.zeros((len(TISSUES), *shape), dtype=torch.float32)
        visible = torch.ones(shape, dtype=torch.float32)
        for fractions, weight in reversed(self.stack):
            seen = weight * visible
            for name, frac in fractions.items():
                out[TISSUES.index(name)].add_(seen if isinstance(frac, float) and frac == 1.0 else seen * frac)
            visible.sub_(seen)
        out[0].add_(visible)
        return out


def render_anatomy(params: Mapping[str, Any], voxel_size: float = 1.0) -> torch.Tensor:
    """Render an anatomy drawn by :func:`sample_anatomy_params` on the t1-linear grid.

    Returns uint8 tissue weights ``(len(TISSUES), X, Y, Z)`` (255 = all of the voxel; they sum to
    about 255). Deterministic for given parameters and voxel size.
    """
    gen = torch.Generator().manual_seed(int(params["seed"]))
    tissues, t_affine = template_tissues()
    world = _world_grid(float(voxel_size))
    shape = world.shape[:3]
    coarse = [max(3, round(s * voxel_size / 30.0)) for s in shape]  # about one node per 3 cm
    centre = torch.tensor(_HEAD_CENTRE)
    # anatomy: world -> template coordinates (pose and size, smooth warp, ventricles); the map is
    # smooth, so it is computed on a grid of half the resolution and interpolated
    half = world[::2, ::2, ::2]
    mat = _rotation(params["rotation_deg"]) / torch.tensor(params["head_scale"], dtype=torch.float32)[None, :]
    src = (half - centre - torch.tensor(params["shift_mm"], dtype=torch.float32)) @ mat.T + centre
    if params["warp_mm"] > 0:
        src += _smooth(gen, half.shape[:3], coarse, 3).permute(1, 2, 3, 0) * params["warp_mm"]
    vc = torch.tensor(_VENTRICLE_CENTRE)
    rel = src - vc
    radial = torch.exp(-(rel * rel).sum(-1, keepdim=True) / (2.0 * 22.0**2))
    src = vc + rel * (1.0 - params["ventricle"] * radial)
    t_origin = torch.tensor(t_affine[:3, 3], dtype=torch.float32)
    sizes = torch.tensor(tissues.shape[1:], dtype=torch.float32)
    grid = (2.0 * (src - t_origin) / (sizes - 1.0) - 1.0).flip(-1).permute(3, 0, 1, 2)[None]
    # half-grid voxel i sits at full-grid voxel 2i: align the corners of the covered range
    covered = [2 * (n - 1) + 1 for n in half.shape[:3]]
    grid = F.interpolate(grid, size=covered, mode="trilinear", align_corners=True)
    grid = F.pad(grid, _pad_spec(shape, covered), mode="replicate").permute(0, 2, 3, 4, 1)
    del src, rel, radial, half
    wm, gm, csf, dist = F.grid_sample(tissues[None], grid, mode="bilinear", padding_mode="border", align_corners=True)[
        0
    ]
    del grid
    if params["atrophy"] > 0:
        loss = gm * (params["atrophy"] * (1.0 + 0.5 * _smooth(gen, shape, coarse)[0])).clamp_(0.0, 1.0)
        gm, csf = gm - loss, csf + loss
    # layers outward from the brain surface, thicknesses varying smoothly over the head
    vary = 1.0 + params["thickness_variation"] * _smooth(gen, shape, coarse, 2).clamp_(-2.0, 2.0)
    b_csf = params["csf_mm"] * vary[0]
    skull = params["skull_mm"] * vary[1]
    table = skull * (1.0 - params["diploe_fraction"]) / 2.0
    b_dura = b_csf + 0.8
    b_inner = b_dura + table
    b_diploe = b_inner + skull * params["diploe_fraction"]
    b_skull = b_diploe + table
    del vary, skull, table
    x, y, z = world[..., 0], world[..., 1], world[..., 2]
    # temporal muscles: thicker soft tissue at the sides, above the ears
    temporal = torch.sigmoid((x.abs() - 45.0) / 5.0) * _band(z, -35.0, 25.0, 6.0) * 5.0
    h = dist - (b_skull + params["muscle_mm"] + temporal + params["fat_mm"] + params["skin_mm"])
    del temporal
    rx, ry = params["neck_radii"]
    neck = (torch.sqrt((x / rx) ** 2 + ((y + 15.0) / ry) ** 2) - 1.0) * min(rx, ry)
    h = torch.minimum(h, neck.add_(torch.sigmoid((z - params["neck_z"]) / 4.0).mul_(60.0)))
    del neck
    face = torch.linalg.vector_norm(
        (world - torch.tensor([0.0, 42.0, -48.0])) / torch.tensor([62.0, 48.0, 40.0]), dim=-1
    )
    h = torch.minimum(h, face.sub_(1.0).mul_(40.0))
    del face
    layers = _Layers()
    head = torch.sigmoid(-h / 0.6)
    layers.lay("muscle", head)
    skin = params["skin_mm"]
    layers.lay("fat", _band(-h, skin, skin + params["fat_mm"], 0.5).mul_(head))
    layers.lay("skin", _band(-h, 0.0, skin, 0.4).mul_(head))
    deep = torch.sigmoid((-h - skin - params["fat_mm"] - 2.0) / 1.0).mul_(torch.sigmoid((dist - b_skull) / 1.0))
    del h, head
    patches = _smooth(gen, shape, [3 * n for n in coarse], 2)
    layers.lay("fat", deep * torch.sigmoid((patches[0] - 0.8) / 0.15))  # fat between the neck muscles
    layers.lay("marrow", deep * torch.sigmoid((patches[1] - 1.4) / 0.15))  # vertebrae, skull base
    del deep
    # face: orbital fat and eyes, air sinuses, all outside the skull
    outside_skull = torch.sigmoid((dist - b_skull) / 0.7)
    ex, ey, ez = params["eye_centre"]
    r_eye = params["eye_radius"]
    for sx in (-1.0, 1.0):
        centre_eye = torch.tensor([sx * ex, ey, ez])
        behind = torch.linalg.vector_norm(world - (centre_eye - torch.tensor([sx * 3.0, 9.0, 0.0])), dim=-1)
        layers.lay("fat", outside_skull * torch.sigmoid((r_eye + 5.0 - behind) / 1.0))
        globe = torch.linalg.vector_norm(world - centre_eye, dim=-1)
        layers.lay("muscle", outside_skull * torch.sigmoid((r_eye + 0.8 - globe) / 0.4))
        layers.lay("vitreous", outside_skull * torch.sigmoid((r_eye - globe) / 0.4))
    del behind, globe
    sinus = torch.linalg.vector_norm(
        (world - torch.tensor([0.0, 38.0, -40.0])) / torch.tensor([11.0, 20.0, 12.0]), dim=-1
    )
    layers.lay(
        "sinus_air", outside_skull * torch.sigmoid((1.0 - sinus) / 0.08) * torch.sigmoid((patches[0] + 1.0) / 0.3)
    )
    del outside_skull, patches, sinus
    # skull layers and meninges
    layers.lay("bone", _band(dist, b_dura, b_skull, 0.35))
    layers.lay("marrow", _band(dist, b_inner, b_diploe, 0.4))
    layers.lay("dura", _band(dist, b_csf, b_dura, 0.3))
    layers.lay("csf", _band(dist, -0.5, b_csf, 0.3))
    layers.lay(
        "sagittal_sinus",
        _band(x, -3.0, 3.0, 0.6) * _band(dist, b_csf - 1.5, b_dura + 1.5, 0.4) * torch.sigmoid(z / 4.0),
    )
    del b_csf, b_dura, b_inner, b_diploe, b_skull
    # the brain itself: template tissue fractions, cortical vessels in the sulcal CSF
    inside = torch.sigmoid(-dist / 0.4)
    total = (wm + gm + csf).clamp_(min=1e-3)
    thin = torch.exp(-((_smooth(gen, shape, [6 * n for n in coarse])[0] / 0.08) ** 2))
    f_wm, f_gm = wm / total, gm / total
    f_csf = (1.0 - f_wm - f_gm).clamp_(min=0.0)  # where the template has no tissue at all: CSF
    fractions = {"wm": f_wm, "gm": f_gm, "csf": f_csf * (1.0 - thin), "cortical_vessel": f_csf * thin}
    layers.lay(fractions, inside)
    return layers.composite().mul_(255.0).round_().to(torch.uint8)


def paint_head(weights: torch.Tensor, contrast: Mapping[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """The noiseless object for tissue ``weights`` (from :func:`render_anatomy`) and a ``contrast``.

    Returns ``(image, head)``: float32 ``(X, Y, Z)`` with white matter near 1, and the soft head
    mask (everything but the background).
    """
    values = contrast["values"]
    img = torch.zeros(weights.shape[1:], dtype=torch.float32)
    for i, name in enumerate(TISSUES):
        if values[name] != 0.0:
            img.add_(weights[i].float(), alpha=values[name] / 255.0)
    if contrast["texture_sd"] > 0:
        gen = torch.Generator().manual_seed(int(contrast["seed"]))
        coarse = [max(6, round(s / 15.0)) for s in img.shape]
        img.mul_(_smooth(gen, img.shape, coarse)[0].mul_(contrast["texture_sd"]).add_(1.0))
    img.clamp_(min=0.0).pow_(contrast["gamma"])
    head = 1.0 - weights[0].float() / 255.0
    return img, head


def render_head(params: Mapping[str, Any], voxel_size: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Render a head drawn by :func:`sample_head_params`: ``(image, head mask)``, see :func:`paint_head`."""
    return paint_head(render_anatomy(params["anatomy"], voxel_size), params["contrast"])


def sample_acquisition_params(
    rng: np.random.RandomState, overrides: Mapping[str, Any] | None = None, base: str = "train"
) -> dict[str, Any]:
    """Draw the acquisition nuisances. ``base="none"`` starts from all nuisances off (then ``overrides``)."""
    r = dict(_ACQUISITION) if base == "train" else dict(_ACQUISITION) | _NUISANCE_OFF
    r |= dict(overrides or {})
    p: dict[str, Any] = {"seed": int(rng.randint(0, 2**31 - 1))}
    p["bias_sd"] = float(_uniform(rng, r["bias_sd"]))
    p["bias_nodes"] = rng.randint(3, 7, size=3).tolist()
    p["lowres_mm"] = float(_uniform(rng, r["lowres_mm"])) if rng.uniform() < r["lowres_prob"] else 0.0
    p["lowres_axis"] = int(rng.randint(0, 3))
    p["gibbs_keep"] = float(_uniform(rng, r["gibbs_keep"])) if rng.uniform() < r["gibbs_prob"] else 1.0
    p["gibbs_axis"] = int(rng.randint(0, 3))  # also the axis of the pulsation ghosts
    p["ghost_intensity"] = float(_uniform(rng, r["ghost_intensity"])) if rng.uniform() < r["ghost_prob"] else 0.0
    p["ghost_period"] = int(rng.randint(2, 6))
    high = rng.uniform() < r["high_noise_prob"]
    p["noise_sd"] = float(_uniform(rng, r["high_noise_sd"] if high else r["noise_sd"]))
    p["gfactor"] = bool(rng.uniform() < r["gfactor_prob"])
    p["zero_background"] = bool(rng.uniform() < r["zero_background_prob"])
    p["fov_cut_mm"] = float(_uniform(rng, r["fov_cut_mm"])) if rng.uniform() < r["fov_cut_prob"] else 0.0
    p["fov_cut_top"] = bool(rng.uniform() < 0.5)
    p["gain"] = float(math.exp(_uniform(rng, (math.log(80.0), math.log(3000.0)))))
    return p


def apply_bias(img: torch.Tensor, params: Mapping[str, Any]) -> torch.Tensor:
    """The receive-field bias of the acquisition (applied to the object, before motion)."""
    if params["bias_sd"] <= 0:
        return img
    gen = torch.Generator().manual_seed(int(params["seed"]) + 1)
    return img * torch.exp(_smooth(gen, img.shape, params["bias_nodes"])[0] * params["bias_sd"])


def _blur_axis(img: torch.Tensor, sigma: float, axis: int) -> torch.Tensor:
    radius = max(1, int(math.ceil(3.0 * sigma)))
    t = torch.arange(-radius, radius + 1, dtype=img.dtype)
    kernel = torch.exp(-0.5 * (t / sigma) ** 2)
    kernel = (kernel / kernel.sum()).reshape(1, 1, -1)
    moved = img.movedim(axis, -1)
    flat = moved.reshape(-1, 1, moved.shape[-1])
    out = F.conv1d(F.pad(flat, (radius, radius), mode="replicate"), kernel)
    return out.reshape(moved.shape).movedim(-1, axis)


def apply_acquisition(
    img: torch.Tensor, head: torch.Tensor, params: Mapping[str, Any], voxel_size: float = 1.0
) -> torch.Tensor:
    """The acquisition chain after the object (and its motion): resolution, Gibbs, ghosts, noise, FOV, storage.

    Deterministic for given parameters: a clean and a moved copy of one head get the same noise.
    """
    gen = torch.Generator().manual_seed(int(params["seed"]))
    out = img
    if params["lowres_mm"] > voxel_size:  # thick slices along one axis, brought back to the grid
        axis, factor = params["lowres_axis"], params["lowres_mm"] / voxel_size
        out = _blur_axis(out, 0.42 * factor, axis)  # slice profile, FWHM about the thickness
        size = list(out.shape)
        low = list(size)
        low[axis] = max(2, int(round(size[axis] / factor)))
        out = F.interpolate(
            F.interpolate(out[None, None], size=low, mode="nearest")[0:1],
            size=size,
            mode="trilinear",
            align_corners=False,
        )[0, 0]
    if params["gibbs_keep"] < 1.0 or params["ghost_intensity"] > 0:
        axis = params["gibbs_axis"]
        spec = torch.fft.fft(out, dim=axis)
        n = out.shape[axis]
        freqs = torch.fft.fftfreq(n).abs()
        window = (freqs <= 0.5 * params["gibbs_keep"]).to(out.dtype)
        if params["ghost_intensity"] > 0:  # pulsation: every k-th line modulated -> faint ghosts (clean)
            lines = torch.ones(n, dtype=out.dtype)
            lines[:: params["ghost_period"]] = 1.0 - params["ghost_intensity"] * params["ghost_period"]
            window = window * lines
        shape = [1, 1, 1]
        shape[axis] = n
        out = torch.fft.ifft(spec * window.reshape(shape), dim=axis).abs()
    sd = params["noise_sd"]
    if params["gfactor"]:
        sd = sd * (1.0 + 0.5 * _smooth(gen, out.shape, (3, 3, 3))[0].abs())
    real = out + torch.randn(out.shape, generator=gen) * sd
    imag = torch.randn(out.shape, generator=gen) * sd
    out = torch.sqrt(real * real + imag * imag)
    if params["zero_background"]:
        out = out * (head > 0.05)
    if params["fov_cut_mm"] > 0:
        cut = int(round(params["fov_cut_mm"] / voxel_size))
        if params["fov_cut_top"]:
            out[..., out.shape[-1] - cut :] = 0.0
        else:
            out[..., :cut] = 0.0
    return torch.round(out * params["gain"]).clamp_(0.0, 32767.0)


def sample_motion_params(
    rng: np.random.RandomState,
    simulators: Sequence[str] = ("image", "kspace"),
    severity: Sequence[float] = (0.8, 8.0),
    weights: Sequence[float] | None = None,
) -> dict[str, Any]:
    """Draw one motion: simulator, phase-encoding axis, severity (log-uniform max rotation in degrees
    and translation in mm), and the simulator's own parameters."""
    sims = list(simulators)
    w = np.asarray(weights if weights is not None else [1.0] * len(sims), dtype=float)
    sim = sims[int(rng.choice(len(sims), p=w / w.sum()))]
    if sim not in MOTION_SIMULATORS:
        raise ValueError(f"unknown motion simulator {sim!r}; use one of {MOTION_SIMULATORS}")
    lo, hi = float(severity[0]), float(severity[1])
    level = float(math.exp(rng.uniform(math.log(lo), math.log(hi)))) if hi > lo else lo
    p: dict[str, Any] = {
        "simulator": sim,
        "phase_axis": int(rng.randint(0, 3)),
        "level": level,
        "seed": int(rng.randint(0, 2**31 - 1)),
    }
    if sim == "torchio":  # TorchIO's own draw: angles and shifts U(-level, level)
        p["num_transforms"] = int(rng.randint(2, 9))
        p["max_rotation"] = p["max_translation"] = level
    elif sim == "image":
        n = int(rng.randint(2, 9))
        deg = rng.uniform(-1.0, 1.0, size=(n, 3))
        trans = rng.uniform(-1.0, 1.0, size=(n, 3))
        deg *= level / np.abs(deg).max()
        trans *= level * rng.uniform(0.7, 1.3) / np.abs(trans).max()
        step = 1.0 / (n + 1)
        times = np.arange(1, n + 1) * step + rng.uniform(-0.3 * step, 0.3 * step, size=n)
        p |= {"degrees": deg.tolist(), "translation": trans.tolist(), "times": times.tolist()}
        p["max_rotation"], p["max_translation"] = float(np.abs(deg).max()), float(np.abs(trans).max())
    else:  # k-space course rescaled so that its maximal pairwise displacement/rotation is level / 2
        p["max_rotation"] = p["max_translation"] = level / 2.0
    return p


def apply_motion(img: torch.Tensor, affine: Any, params: Mapping[str, Any], resampler: str = "auto") -> torch.Tensor:
    """Apply a motion drawn by :func:`sample_motion_params` to an ``(X, Y, Z)`` object."""
    from scripts.motion import RandKSpaceMotion, apply_image_motion

    vol = img[None]
    aff = torch.as_tensor(affine, dtype=torch.float64)
    sim = params["simulator"]
    if sim == "image":
        out = apply_image_motion(
            vol,
            aff,
            torch.tensor(params["degrees"]),
            torch.tensor(params["translation"]),
            torch.tensor(params["times"]),
            phase_axis=params["phase_axis"],
            output="magnitude",
            resampler=resampler,
        )
    elif sim == "kspace":
        g = params["level"] / 2.0
        motion = RandKSpaceMotion(
            prob=1.0, global_disp=(g, g), global_rot=(g, g), phase_axis=params["phase_axis"], resampler=resampler
        )
        motion.set_random_state(seed=int(params["seed"]))
        out = torch.as_tensor(motion(MetaTensor(vol, affine=aff)))
    else:
        from scripts.motion.torchio_motion import torchio_motion

        lvl = float(params["level"])
        out = torchio_motion(
            MetaTensor(vol, affine=aff), (-lvl, lvl), (-lvl, lvl), params["num_transforms"], seed=params["seed"]
        )
        out = torch.as_tensor(out).abs()
    return out[0].float()


class SyntheticHeadPaird(RandomizableTransform, MapTransform):
    """Make a clean/moved pair of synthetic heads from one draw (dictionary transform).

    The input dictionary needs no keys (a datalist item such as ``{"id": 3}`` is fine). Writes
    ``image`` = ``(2, X, Y, Z)`` MetaTensor in t1-linear space (channel 0 clean, channel 1 moved),
    ``label`` = ``tensor([0, 1])`` and ``motion`` = the drawn motion's severity as numbers. Batches of
    pairs are flattened to single-channel images by :func:`unpair_batch`.

    Rendering an anatomy costs several seconds; with ``anatomy_reuse`` > 1 the transform keeps the
    last anatomy for that many calls, each with a new contrast, acquisition and motion.

    Args:
        keys: output image key.
        label_key: output label key.
        regime: anatomy/contrast regime (:data:`REGIMES`).
        simulators, simulator_weights, severity: motion mixture, see :func:`sample_motion_params`.
        acquisition: overrides of the acquisition nuisance ranges.
        acquisition_base: ``"train"`` (all nuisances drawn) or ``"none"`` (all off but the overrides).
        voxel_size: 1 mm for the real size; larger for tests.
        anatomy_reuse: calls per rendered anatomy.
        resampler: resampler of the motion simulators.
    """

    def __init__(
        self,
        keys: str = "image",
        label_key: str = "label",
        regime: str | Mapping[str, Any] = "train",
        simulators: Sequence[str] = ("image", "kspace"),
        simulator_weights: Sequence[float] | None = None,
        severity: Sequence[float] = (0.8, 8.0),
        acquisition: Mapping[str, Any] | None = None,
        acquisition_base: str = "train",
        voxel_size: float = 1.0,
        anatomy_reuse: int = 1,
        resampler: str = "auto",
    ) -> None:
        MapTransform.__init__(self, keys)
        RandomizableTransform.__init__(self, prob=1.0)
        if anatomy_reuse < 1:
            raise ValueError(f"anatomy_reuse must be >= 1, got {anatomy_reuse}")
        self.label_key, self.regime = label_key, regime
        self.simulators, self.simulator_weights, self.severity = list(simulators), simulator_weights, tuple(severity)
        self.acquisition, self.acquisition_base = dict(acquisition or {}), acquisition_base
        self.voxel_size, self.anatomy_reuse, self.resampler = float(voxel_size), int(anatomy_reuse), resampler
        self.anatomy: dict[str, Any] = {}
        self.contrast: dict[str, Any] = {}
        self.acq: dict[str, Any] = {}
        self.motion: dict[str, Any] = {}
        self._weights: torch.Tensor | None = None
        self._uses = 0

    def randomize(self, data: Any = None) -> None:
        if self._weights is None or self._uses >= self.anatomy_reuse:
            self.anatomy = sample_anatomy_params(self.R, self.regime)
            self._weights, self._uses = None, 0
        self.contrast = sample_contrast_params(self.R, self.regime)
        self.acq = sample_acquisition_params(self.R, self.acquisition, self.acquisition_base)
        self.motion = sample_motion_params(self.R, self.simulators, self.severity, self.simulator_weights)

    def render(self, moved: bool = True) -> tuple[torch.Tensor, ...]:
        """The clean image, and the moved one when ``moved``, for the current draw (each ``(X, Y, Z)``)."""
        _, affine = t1_linear_grid(self.voxel_size)
        if self._weights is None:
            self._weights = render_anatomy(self.anatomy, self.voxel_size)
        self._uses += 1
        obj, head = paint_head(self._weights, self.contrast)
        obj = apply_bias(obj, self.acq)
        images = [apply_acquisition(obj, head, self.acq, self.voxel_size)]
        if moved:
            images.append(
                apply_acquisition(
                    apply_motion(obj, affine, self.motion, self.resampler), head, self.acq, self.voxel_size
                )
            )
        return tuple(images)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        self.randomize()
        _, affine = t1_linear_grid(self.voxel_size)
        clean, moved = self.render(moved=True)
        d[self.keys[0]] = MetaTensor(torch.stack([clean, moved]), affine=torch.as_tensor(affine))
        d[self.label_key] = torch.tensor([0, 1])
        d["motion"] = {k: float(self.motion[k]) for k in ("level", "max_rotation", "max_translation")}
        return d


class SyntheticHeadd(SyntheticHeadPaird):
    """One synthetic head, moved with probability ``prob`` (label 1) or clean (label 0): ``(1, X, Y, Z)``.

    For validation and test sets; the other parameters are those of :class:`SyntheticHeadPaird`.
    """

    def __init__(self, *args: Any, prob: float = 0.5, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.prob = float(prob)
        self.moved = False

    def randomize(self, data: Any = None) -> None:
        super().randomize(data)
        self.moved = bool(self.R.uniform() < self.prob)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        self.randomize()
        _, affine = t1_linear_grid(self.voxel_size)
        images = self.render(moved=self.moved)
        d[self.keys[0]] = MetaTensor(images[-1][None], affine=torch.as_tensor(affine))
        d[self.label_key] = int(self.moved)
        zero = {"level": 0.0, "max_rotation": 0.0, "max_translation": 0.0}
        d["motion"] = {k: float(self.motion[k]) for k in zero} if self.moved else zero
        return d


def synthetic_items(n: int, start: int = 0) -> list[dict[str, int]]:
    """``n`` datalist items ``{"id": i}`` for a dataset of synthetic heads (the transform draws the head)."""
    return [{"id": int(i)} for i in range(start, start + n)]


def unpair_batch(batch: Mapping[str, Any], keys: Sequence[str] = ("image", "label")) -> dict[str, Any]:
    """Flatten a batch of pairs: ``image (B, 2, ...)`` -> ``(2B, 1, ...)``, ``label (B, 2)`` -> ``(2B,)``."""
    out = dict(batch)
    img_key, label_key = keys
    img = batch[img_key]
    out[img_key] = img.reshape(img.shape[0] * img.shape[1], 1, *img.shape[2:])
    out[label_key] = torch.as_tensor(batch[label_key]).reshape(-1)
    return out


class PairedPrepareBatch:
    """``prepare_batch`` for MONAI engines fed with pairs: images to the device as plain tensors in
    ``memory_format`` (channels-last 3D is fastest for Conv3d on CPU).

    BatchNorm must not see the clean and the moved image of one head in the same forward pass: the
    batch statistics would let the network compare the two (training loss near zero, validation in
    eval mode no better than chance; measured). With ``split_pairs`` (default) each pair is split
    across consecutive calls: a call returns, for every pair of its batch, one of its two images
    (chosen at random) together with the images held back from the previous call, whose pairs are
    other heads. Every image is still used once, and a forward pass mixes labels at random. The first
    call of a run has nothing held back and returns its batch as it is.
    """

    def __init__(
        self, memory_format: torch.memory_format = torch.contiguous_format, split_pairs: bool = True, seed: int = 0
    ) -> None:
        self.memory_format = memory_format
        self.split_pairs = split_pairs
        self.rng = np.random.RandomState(seed)
        self._held: tuple[torch.Tensor, torch.Tensor] | None = None

    def __call__(self, batchdata: Mapping[str, Any], device: Any = None, non_blocking: bool = False, **kwargs: Any):
        image = batchdata["image"]
        if isinstance(image, MetaTensor):  # metadata on every op of the step costs ~45 % on CPU
            image = image.as_tensor()
        image = torch.as_tensor(image)
        label = torch.as_tensor(batchdata["label"])
        if not self.split_pairs or self._held is None:
            flat = unpair_batch({"image": image, "label": label})
            x, y = flat["image"], flat["label"]
            if self.split_pairs:  # hold back nothing yet; from the next call on, pairs are split
                self._held = (x[:0], y[:0])
        else:
            pick = torch.as_tensor(self.rng.randint(0, 2, size=image.shape[0]))
            rows = torch.arange(image.shape[0])
            now_x, now_y = image[rows, pick][:, None], label[rows, pick]
            later_x, later_y = image[rows, 1 - pick][:, None], label[rows, 1 - pick]
            x = torch.cat([self._held[0], now_x])
            y = torch.cat([self._held[1], now_y])
            self._held = (later_x.clone(), later_y.clone())
        x = x.to(device=device, non_blocking=non_blocking).contiguous(memory_format=self.memory_format)
        return x, y.to(device=device, non_blocking=non_blocking)


class RepeatBatches:
    """Yield every batch of ``loader`` ``repeats`` times, each repeat mirrored left-right.

    On 2 cores the generator worker is the bottleneck (a pair of full-size heads costs 3-5 s to draw,
    a training step on 4 images about 4 s), so the training core would wait half the time. Seeing each
    drawn batch again, mirrored (``flip_dim`` is the left-right axis of RAS t1-linear space; a moved head
    mirrored is still moved, a clean one still clean), fills that wait with useful gradient steps.
    Repeat ``k`` is mirrored when ``k`` is odd, so ``repeats=2`` gives each head once as drawn and once
    mirrored. Sized: ``len(loader) * repeats``, so MONAI's workflows take it as an epoch length.
    """

    def __init__(self, loader: Any, repeats: int = 2, keys: Sequence[str] = ("image",), flip_dim: int = -3) -> None:
        if repeats < 1:
            raise ValueError(f"repeats must be >= 1, got {repeats}")
        self.loader, self.repeats, self.keys, self.flip_dim = loader, int(repeats), tuple(keys), int(flip_dim)

    def __len__(self) -> int:
        return len(self.loader) * self.repeats

    def __iter__(self) -> Any:
        for batch in self.loader:
            for k in range(self.repeats):
                if k % 2 == 0:
                    yield batch
                else:
                    yield {
                        key: (torch.flip(v, dims=(self.flip_dim,)) if key in self.keys else v)
                        for key, v in batch.items()
                    }


def make_synthetic_dataset(
    output_dir: str | Any,
    n: int,
    seed: int = 0,
    key: str = "validation",
    prob: float = 0.5,
    voxel_size: float = 1.0,
    anatomy_reuse: int = 4,
    **kwargs: Any,
) -> Any:
    """Write ``n`` synthetic heads (clean or moved with probability ``prob``) as int16 NIfTI and a
    datalist ``{key: [{"image", "label", "participant_id", "level", "max_rotation", "max_translation",
    "simulator"}]}``; return the datalist path. A folder that already holds the datalist is reused.

    ``kwargs`` go to :class:`SyntheticHeadd` (regime, simulators, severity, acquisition, ...).
    Deterministic for given arguments.
    """
    from pathlib import Path

    from scripts.common.files import write_json_atomic

    out = Path(output_dir)
    datalist = out / "datalist.json"
    if datalist.is_file():
        return datalist
    gen = SyntheticHeadd(prob=prob, voxel_size=voxel_size, anatomy_reuse=anatomy_reuse, **kwargs)
    gen.set_random_state(seed=seed)
    _, affine = t1_linear_grid(voxel_size)
    items = []
    for i in range(int(n)):
        d = gen({})
        rel = f"sub-S{i:04d}.nii.gz"
        write_nifti(d["image"][0].numpy(), affine, out / rel)
        items.append(
            {
                "image": rel,
                "label": int(d["label"]),
                "participant_id": f"sub-S{i:04d}",
                "simulator": gen.motion["simulator"] if d["label"] else "none",
            }
            | d["motion"]
        )
    return write_json_atomic({key: items}, datalist)


#: Images that are not a T1w brain in t1-linear space, for calibrating and testing the QC gates.
NON_BRAINS: dict[str, str] = {
    "noise": "background noise only (an empty field of view)",
    "smooth_noise": "smooth random blobs",
    "label_map": "a tissue segmentation (integer labels) of a head",
    "inverted": "a head with inverted contrast (dark white matter, bright CSF)",
    "upside_down": "a head flipped top to bottom (not in t1-linear orientation)",
    "misregistered": "a head shifted by 45-60 mm (registration failed)",
    "body_part": "another body part: a limb-like cylinder of fat, muscle and bone",
    "sparse": "a few bright dots in an empty volume",
}


def make_non_brain(kind: str, head: torch.Tensor | np.ndarray, seed: int = 0) -> np.ndarray:
    """A non-brain image on the grid of ``head`` (a clean synthetic head ``(X, Y, Z)``, used by the
    head-derived kinds and for the intensity scale). ``kind`` is a key of :data:`NON_BRAINS`."""
    from scipy import ndimage

    if kind not in NON_BRAINS:
        raise ValueError(f"unknown non-brain kind {kind!r}; expected one of {sorted(NON_BRAINS)}")
    h = np.asarray(head, dtype=np.float32)
    rng = np.random.RandomState(seed)
    scale = float(np.percentile(h, 99))
    shape = h.shape
    if kind == "noise":
        out = np.abs(rng.normal(0.0, 0.03 * scale, shape))
    elif kind == "smooth_noise":
        out = ndimage.gaussian_filter(rng.random_sample(shape), sigma=max(1.0, shape[0] / 40)) * scale
    elif kind == "label_map":
        levels = np.percentile(h[h > 0.05 * scale], [40, 65, 85])
        out = np.digitize(h, levels).astype(np.float32) * (h > 0.05 * scale)
    elif kind == "inverted":
        inside = ndimage.binary_fill_holes(ndimage.gaussian_filter(h, 2) > 0.1 * scale)
        out = (scale - np.clip(h, 0, scale)) * inside
    elif kind == "upside_down":
        out = h[:, :, ::-1]
    elif kind == "misregistered":
        shift = [0, 0, 0]
        axis = rng.randint(0, 3)
        shift[axis] = int(round(rng.uniform(45, 60) / grid_voxel(shape)))  # mm -> voxels of this grid
        shift[axis] *= 1 if rng.uniform() < 0.5 else -1
        out = ndimage.shift(h, shift, order=0, mode="constant")
    elif kind == "body_part":
        x, y = np.meshgrid(np.linspace(-1, 1, shape[0]), np.linspace(-1, 1, shape[1]), indexing="ij")
        a, b = rng.uniform(0.6, 0.9), rng.uniform(0.5, 0.8)
        r = np.sqrt((x / a) ** 2 + (y / b) ** 2)
        bone_r = np.sqrt(((x - rng.uniform(-0.2, 0.2)) / 0.15) ** 2 + ((y - rng.uniform(-0.2, 0.2)) / 0.15) ** 2)
        slab = np.where(r < 0.85, 0.45, np.where(r < 1.0, 1.0, 0.0))  # muscle inside a fat layer
        slab = np.where(bone_r < 0.6, 0.9, np.where(bone_r < 1.0, 0.05, slab))  # marrow inside cortical bone
        texture = 1.0 + 0.1 * ndimage.gaussian_filter(rng.standard_normal(shape), 2.0)
        out = slab[:, :, None] * texture * scale + np.abs(rng.normal(0.0, 0.02 * scale, shape))
    else:  # sparse
        out = np.zeros(shape, dtype=np.float32)
        idx = tuple(rng.randint(0, s, size=20) for s in shape)
        out[idx] = scale
    return np.ascontiguousarray(out, dtype=np.float32)
