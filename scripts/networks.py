"""Networks of the bundle.

``Conv5FC3`` is ClinicaDL's five-block 3D CNN with a three-layer fully connected head, the network
of Loizillon et al. It is rebuilt from MONAI's layer factories with ClinicaDL's exact layer order, so
its state-dict keys (``convolutions.{0,1,4,5,...}``, ``fc.{2,4,6}``) match ClinicaDL checkpoints.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from monai.networks.layers.factories import Act, Conv, Dropout, Norm, Pool
from torch import nn

__all__ = ["PadMaxPool3d", "Conv5FC3", "classifier_head_names"]


class PadMaxPool3d(nn.Module):
    """2x2x2 max pooling that first pads odd dimensions by one voxel on the low-index side.

    The output size of a dimension of size ``n`` is ``ceil(n / 2)``. The pad value is 0, which never
    wins the maximum because this layer follows a ReLU.
    """

    def __init__(self, kernel_size: int = 2, stride: int = 2) -> None:
        super().__init__()
        self.kernel_size = kernel_size
        self.stride = stride
        self.pool = Pool[Pool.MAX, 3](kernel_size=kernel_size, stride=stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Pool a (B, C, X, Y, Z) tensor to (B, C, ceil(X/2), ceil(Y/2), ceil(Z/2))."""
        pads = [(-size) % self.stride for size in x.shape[2:]]  # voxels missing to a multiple of the stride
        if any(pads):
            # F.pad lists the last dimension first: (z_low, z_high, y_low, y_high, x_low, x_high)
            x = F.pad(x, (pads[2], 0, pads[1], 0, pads[0], 0))
        return self.pool(x)


class Conv5FC3(nn.Module):
    """ClinicaDL's Conv5_FC3 (Loizillon et al., METHOD.md §4.1).

    Five blocks ``Conv3d(k3, p1) -> BatchNorm3d -> ReLU -> PadMaxPool3d`` with 8, 16, 32, 64 and 128
    channels, then ``Flatten -> Dropout -> Linear(n, 1300) -> ReLU -> Linear(1300, 50) -> ReLU ->
    Linear(50, num_classes)``. At 1x169x208x179 the flattened size is 128x6x7x6 = 32,256 and the
    network has 42,293,972 trainable parameters.

    Args:
        input_size: spatial size (X, Y, Z) of the input; the flattened size follows from it, so
            reduced sizes work for tests.
        in_channels: number of input channels.
        num_classes: number of output logits.
        dropout: dropout probability before the first linear layer (ClinicaDL's default 0).
        channels: output channels of the five convolution blocks.
    """

    #: modules fine-tuned in transfer learning (the three linear layers).
    head_modules: tuple[str, ...] = ("fc",)

    def __init__(
        self,
        input_size: Sequence[int] = (169, 208, 179),
        in_channels: int = 1,
        num_classes: int = 2,
        dropout: float = 0.0,
        channels: Sequence[int] = (8, 16, 32, 64, 128),
    ) -> None:
        super().__init__()
        if len(input_size) != 3:
            raise ValueError(f"Conv5FC3 expects a 3D input size, got {tuple(input_size)}.")
        self.input_size = tuple(int(s) for s in input_size)
        self.expected_spatial = list(self.input_size)
        conv_type, norm_type, act_type = Conv[Conv.CONV, 3], Norm[Norm.BATCH, 3], Act[Act.RELU]
        layers: list[nn.Module] = []
        prev = in_channels
        for ch in channels:
            layers += [conv_type(prev, ch, kernel_size=3, stride=1, padding=1), norm_type(ch), act_type(inplace=True), PadMaxPool3d()]
            prev = ch
        self.convolutions = nn.Sequential(*layers)
        reduced = [s for s in self.input_size]
        for _ in channels:
            reduced = [math.ceil(s / 2) for s in reduced]
        self.flattened_size = prev * math.prod(reduced)
        self.fc = nn.Sequential(
            nn.Flatten(),
            Dropout[Dropout.DROPOUT, 1](p=dropout),
            nn.Linear(self.flattened_size, 1300),
            act_type(),
            nn.Linear(1300, 50),
            act_type(),
            nn.Linear(50, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map a (B, C, X, Y, Z) batch to (B, num_classes) logits."""
        spatial = list(x.shape[2:])
        if spatial != self.expected_spatial:
            raise ValueError(
                "Conv5FC3 was built for inputs of spatial size "
                + str(self.expected_spatial)
                + ", got "
                + str(spatial)
                + "; set the network's input_size (config key `spatial_size`) to the image size."
            )
        return self.fc(self.convolutions(x))


def classifier_head_names(network: nn.Module) -> tuple[str, ...]:
    """Names of the submodules forming ``network``'s classifier head (used to select what fine-tuning trains)."""
    names = getattr(network, "head_modules", None)
    if not names:
        raise ValueError(f"{type(network).__name__} does not declare its classifier head (`head_modules`).")
    return tuple(names)
