"""Saliency maps of the QC job: where the network sees motion, drawn under each thumbnail.

Two of MONAI's explainers: Grad-CAM on the layer a network declares (``saliency_layer``, see
:mod:`scripts.networks`; all four architectures but ViT3D have one), and occlusion sensitivity (slower,
any network). Maps are (X, Y, Z) arrays scaled to [0, 1].
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import numpy as np
import torch

__all__ = ["GradCAMScorer", "OcclusionMap"]

logger = logging.getLogger(__name__)


class GradCAMScorer:
    """Motion probability and Grad-CAM map of one image in one forward and one partial backward pass.

    MONAI's GradCAM on ``layer``, made cheap: the weights do not require gradients and the graph is cut
    at the target layer (its output becomes a leaf), so the backward pass only runs through the layers
    above it; the forward pass also gives the probability. Set up on first use (it changes the network:
    hooks, frozen weights), so the network must be used for inference only afterwards.
    """

    def __init__(self, network: torch.nn.Module, layer: str, motion_index: int = 1) -> None:
        self.network = network
        self.layer = layer
        self.motion_index = int(motion_index)
        self._cam: Callable | None = None
        self._logits: torch.Tensor | None = None

    def _setup(self) -> None:
        import warnings

        from monai.visualize import GradCAM

        warnings.filterwarnings("ignore", message="Full backward hook is firing")
        for param in self.network.parameters():
            param.requires_grad_(False)
        target = dict(self.network.named_modules())[self.layer]
        target.register_forward_hook(lambda module, args, output: output.detach().requires_grad_(True))
        self.network.register_forward_hook(lambda module, args, output: setattr(self, "_logits", output.detach()))
        self._cam = GradCAM(nn_module=self.network, target_layers=self.layer)

    def __call__(self, x: torch.Tensor) -> tuple[float, np.ndarray]:
        """``(probability, map)`` of a (1, C, X, Y, Z) batch on the network's device."""
        if self._cam is None:
            self._setup()
        sal = self._cam(x, class_idx=self.motion_index)
        prob = torch.softmax(self._logits.float(), dim=1)[0, self.motion_index].item()
        return prob, sal.detach().cpu().numpy()[0, 0]


class OcclusionMap:
    """MONAI occlusion sensitivity of the motion class: hiding a region lowers the motion logit when the
    region pushes towards motion; that drop, scaled to [0, 1], is the map."""

    def __init__(self, network: torch.nn.Module, motion_index: int = 1) -> None:
        self.network = network
        self.motion_index = int(motion_index)
        self._occlusion: Callable | None = None

    def __call__(self, x: torch.Tensor) -> np.ndarray:
        """The map of a (1, C, X, Y, Z) batch on the network's device."""
        if self._occlusion is None:
            from monai.visualize import OcclusionSensitivity

            size = max(2, int(x.shape[2]) // 6)
            self._occlusion = OcclusionSensitivity(
                nn_module=self.network, mask_size=size, overlap=0.0, n_batch=8, mode="mean_img"
            )
        with torch.no_grad():
            occ, _ = self._occlusion(x)
        sal = -occ[:, self.motion_index : self.motion_index + 1]
        sal = (sal - sal.min()) / (sal.max() - sal.min()).clamp(min=1e-8)
        return sal.cpu().numpy()[0, 0]
