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
from monai.networks.nets import ViT
from torch import nn

__all__ = [
    "PadMaxPool3d",
    "batchnorm_maxpool3d",
    "Conv5FC3",
    "ResidualBlock3D",
    "ResNet3D",
    "SECNN",
    "ViT3D",
    "classifier_head_names",
    "feature_block_names",
    "set_batchnorm_momentum",
]


class PadMaxPool3d(nn.Module):
    """2x2x2 max pooling that first pads odd dimensions by one voxel on the low-index side.

    The output size of a dimension of size ``n`` is ``ceil(n / 2)``; the first window of an odd
    dimension holds its first voxel and the pad. This layer follows a ReLU, so the pad never wins the
    maximum whatever its value: the windows are taken with max pooling's own padding (``padding=1`` on
    an odd dimension starts the windows at -1 and drops the unused high-side pad), which avoids
    copying the whole activation into a padded tensor (and the gradient back out of it) at every
    block; ClinicaDL's explicit zero pad gives the same outputs and gradients on nonnegative inputs.
    ``explicit_pad=True`` pads explicitly as ClinicaDL does (the reference of the tests and benchmarks).
    """

    def __init__(self, kernel_size: int = 2, stride: int = 2, explicit_pad: bool = False) -> None:
        super().__init__()
        self.kernel_size = kernel_size
        self.stride = stride
        self.explicit_pad = explicit_pad
        self.pool = Pool[Pool.MAX, 3](kernel_size=kernel_size, stride=stride)

    def low_side_pads(self, spatial: list[int]) -> list[int]:
        """Voxels missing to a multiple of the stride along each spatial dimension (padded on the low side)."""
        return [(-size) % self.stride for size in spatial]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Pool a (B, C, X, Y, Z) tensor to (B, C, ceil(X/2), ceil(Y/2), ceil(Z/2))."""
        pads = self.low_side_pads(list(x.shape[2:]))
        if not any(pads):
            return self.pool(x)
        # (tracing, e.g. the legacy ONNX exporter, records the sizes as tensors: pooling padding cannot take them)
        pooling_pads = not self.explicit_pad and self.kernel_size == self.stride and max(pads) <= self.kernel_size // 2
        if pooling_pads and not torch.jit.is_tracing():
            # symmetric pooling padding p gives floor((n + 2p - k) / k) + 1 = (n + p) / k windows starting
            # at -p: exactly the windows of a low-side pad of p (the high-side pad is never reached)
            return F.max_pool3d(x, self.kernel_size, self.stride, padding=(pads[0], pads[1], pads[2]))
        # F.pad lists the last dimension first: (z_low, z_high, y_low, y_high, x_low, x_high)
        return self.pool(F.pad(x, (pads[2], 0, pads[1], 0, pads[0], 0)))


class _BatchNormMaxPool3d(torch.autograd.Function):
    """Training-mode BatchNorm followed by 2x2x2 max pooling, without the normalised full-size tensor.

    BatchNorm is a per-channel affine map ``z = scale * y + shift`` once the batch statistics are known,
    and an affine map with a nonnegative scale commutes with the maximum (with a negative scale the
    maximum of ``z`` is at the minimum of ``y``). So the forward pass takes the batch statistics of
    ``y`` (two passes), pools ``y`` itself and normalises only the pooled eighth; the backward pass
    needs the gradient of ``z`` only where a window's maximum is, which makes the sums of BatchNorm's
    backward pass sums over the pooled eighth, and leaves one dense pass ``dy = a * y + b`` on top of
    pooling's own scatter. The full-size normalised tensor is never written, read or kept for backward.
    """

    @staticmethod
    def forward(ctx, y, weight, bias, eps, padding):  # noqa: D102 (torch.autograd.Function protocol)
        channels = y.shape[1]
        n = y.numel() // channels
        # two-pass statistics (mean, then the mean square of the deviations): as exact as float32 allows,
        # and faster on channels-last tensors than torch.var_mean's one-pass kernel
        mean = y.sum(dim=(0, 2, 3, 4)) / n
        var = torch.zeros_like(mean)
        for sample in y.split(1):  # deviations one sample at a time: a temporary of one image, not the batch
            var += (sample - _per_channel(mean)).square_().sum(dim=(0, 2, 3, 4))
        var /= n
        invstd = torch.rsqrt(var + eps)
        scale = invstd if weight is None else weight * invstd
        shift = -mean * scale if bias is None else bias - mean * scale
        if bool((scale < 0).any()):  # pool sign * y: the minimum of y where the scale is negative
            sign = _per_channel(torch.where(scale < 0, -1.0, 1.0).to(y.dtype))
            pooled, indices = F.max_pool3d(y * sign, 2, 2, padding=padding, return_indices=True)
            pooled = pooled * sign
        else:
            pooled, indices = F.max_pool3d(y, 2, 2, padding=padding, return_indices=True)
        out = torch.addcmul(_per_channel(shift), pooled, _per_channel(scale))
        ctx.save_for_backward(y, indices, pooled, mean, invstd, scale)
        ctx.padding = padding
        ctx.has_weight, ctx.has_bias = weight is not None, bias is not None
        ctx.mark_non_differentiable(mean, var)
        return out, mean, var

    @staticmethod
    def backward(ctx, grad_out, _grad_mean, _grad_var):  # noqa: D102
        y, indices, pooled, mean, invstd, scale = ctx.saved_tensors
        n = y.numel() // y.shape[1]
        grad_shift = grad_out.sum(dim=(0, 2, 3, 4))  # = d loss / d bias
        xhat = (pooled - _per_channel(mean)) * _per_channel(invstd)  # normalised values at the maxima
        grad_weight = (grad_out * xhat).sum(dim=(0, 2, 3, 4))  # = d loss / d weight
        # BatchNorm's input gradient: scale * (dz - mean(dz) - xhat * mean(dz * xhat)), where dz is
        # grad_out scattered to the maxima; both means are sums over the maxima divided by n
        dense_slope = -scale * invstd * grad_weight / n
        dense_offset = -scale * grad_shift / n - dense_slope * mean
        grad_y = torch.ops.aten.max_pool3d_with_indices_backward(
            grad_out * _per_channel(scale), y, [2, 2, 2], [2, 2, 2], list(ctx.padding), [1, 1, 1], False, indices
        )
        grad_y.addcmul_(y, _per_channel(dense_slope)).add_(_per_channel(dense_offset))
        return (grad_y, grad_weight if ctx.has_weight else None, grad_shift if ctx.has_bias else None, None, None)


def _per_channel(values: torch.Tensor) -> torch.Tensor:
    return values.view(1, -1, 1, 1, 1)


def batchnorm_maxpool3d(y: torch.Tensor, norm: nn.BatchNorm3d, pool: PadMaxPool3d | None = None) -> torch.Tensor:
    """``pool(norm(y))`` for a BatchNorm in training mode and a 2x2x2 ``PadMaxPool3d`` (the default), fused
    (see :class:`_BatchNormMaxPool3d`).

    Same outputs, gradients (input, weight, bias) and running-statistics update as the two modules, to
    float rounding (PyTorch's own channels-last BatchNorm kernel sums 25 million voxels per channel less
    exactly than the two passes here). ``norm`` must be a training-mode BatchNorm3d that tracks running
    statistics; its ``momentum`` (``None``: cumulative average) and ``num_batches_tracked`` are honoured.
    """
    if not (norm.training and norm.track_running_stats and norm.running_mean is not None):
        raise ValueError("batchnorm_maxpool3d needs a BatchNorm3d in training mode that tracks running statistics.")
    padding = tuple((pool or PadMaxPool3d()).low_side_pads(list(y.shape[2:])))
    out, mean, var = _BatchNormMaxPool3d.apply(y, norm.weight, norm.bias, norm.eps, padding)
    with torch.no_grad():
        norm.num_batches_tracked.add_(1)
        factor = 1.0 / float(norm.num_batches_tracked) if norm.momentum is None else norm.momentum
        n = y.numel() // y.shape[1]
        norm.running_mean.mul_(1.0 - factor).add_(mean, alpha=factor)
        norm.running_var.mul_(1.0 - factor).add_(var * (n / max(n - 1, 1)), alpha=factor)  # unbiased, as PyTorch
    return out


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
        pool_before_relu: how many blocks, from the first, pool before their ReLU (``Conv3d -> BatchNorm3d
            -> PadMaxPool3d -> ReLU``). ReLU is monotone, so ``relu(max(window)) == max(relu(window))``:
            outputs and every gradient are those of ClinicaDL's order (bit-identical, tested), but the
            ReLU and its backward pass see an eighth of the voxels. The first blocks hold almost all the
            activations (the first alone 200 MB per image at 169x208x179), hence the default 3; block 4
            keeps ClinicaDL's order so that its ReLU (``saliency_layer``) is explained at full resolution.
            The state dict is the same for every value (ReLU and pooling have no parameters).
        fuse_batchnorm_pool: in training mode on CPU, run BatchNorm and pooling of the blocks that pool
            before their ReLU as one operation (:func:`batchnorm_maxpool3d`): the normalised full-size
            activation is never written, and BatchNorm's backward pass sums over the pooled eighth. Same
            outputs, gradients and running statistics to float rounding (tested). Evaluation, CUDA,
            MetaTensor inputs (give plain tensors: ``ChannelsLastPrepareBatch(as_tensor=True)``, the
            default of configs/train.yaml), TorchScript, tracing, ``torch.compile`` and modules with hooks
            take the plain module path; ``False`` always does (the fallback; ``--fuse_batchnorm_pool false``
            in configs/train.yaml).
    """

    #: modules fine-tuned in transfer learning (the three linear layers).
    head_modules: tuple[str, ...] = ("fc",)
    #: the layer whose activations Grad-CAM explains (the QC job's saliency maps): the ReLU of block 4.
    saliency_layer: str | None = "convolutions.14"

    def __init__(
        self,
        input_size: Sequence[int] = (169, 208, 179),
        in_channels: int = 1,
        num_classes: int = 2,
        dropout: float = 0.0,
        channels: Sequence[int] = (8, 16, 32, 64, 128),
        pool_before_relu: int = 3,
        fuse_batchnorm_pool: bool = True,
    ) -> None:
        super().__init__()
        if not 0 <= pool_before_relu <= min(3, len(channels)):
            raise ValueError(f"pool_before_relu must be in 0..{min(3, len(channels))}, got {pool_before_relu}.")
        if len(input_size) != 3:
            raise ValueError(f"Conv5FC3 expects a 3D input size, got {tuple(input_size)}.")
        self.input_size = tuple(int(s) for s in input_size)
        self.pool_before_relu = int(pool_before_relu)
        self.fuse_batchnorm_pool = bool(fuse_batchnorm_pool)
        self.expected_spatial = list(self.input_size)
        conv_type, norm_type, act_type = Conv[Conv.CONV, 3], Norm[Norm.BATCH, 3], Act[Act.RELU]
        layers: list[nn.Module] = []
        prev = in_channels
        for i, ch in enumerate(channels):
            relu_pool = [act_type(inplace=True), PadMaxPool3d()]
            layers += [
                conv_type(prev, ch, kernel_size=3, stride=1, padding=1),
                norm_type(ch),
                *(relu_pool[::-1] if i < pool_before_relu else relu_pool),
            ]
            prev = ch
        self.convolutions = nn.Sequential(*layers)
        reduced = list(self.input_size)
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
        if not torch.jit.is_scripting():
            if self._fuses(x):
                return self.fc(self._fused_convolutions(x))
        return self.fc(self.convolutions(x))

    @torch.jit.unused
    def _fuses(self, x: torch.Tensor) -> bool:
        """Whether this forward pass takes the fused BatchNorm + pooling path (see ``fuse_batchnorm_pool``)."""
        return (
            self.fuse_batchnorm_pool
            and self.training
            and x.device.type == "cpu"
            and type(x) is torch.Tensor  # MetaTensor batches: MONAI's metadata on every op, the module path
            and not torch.jit.is_tracing()
            and not torch.compiler.is_compiling()
            and not (self.convolutions._forward_hooks or self.convolutions._forward_pre_hooks)
        )

    @torch.jit.unused
    def _fused_convolutions(self, x: torch.Tensor) -> torch.Tensor:
        """``self.convolutions(x)`` with BatchNorm and pooling fused in the blocks that pool before the ReLU."""
        layers = list(self.convolutions)
        for block in range(len(layers) // 4):
            conv, norm, third, fourth = layers[4 * block : 4 * block + 4]
            x = conv(x)
            if block < self.pool_before_relu and _fusible(norm, third):
                x = fourth(batchnorm_maxpool3d(x, norm, third))
            else:
                x = fourth(third(norm(x)))
        return x

    def block_modules(self) -> tuple[tuple[str, ...], ...]:
        """Parameterised modules of each convolution block, first to last (conv and BatchNorm)."""
        return tuple((f"convolutions.{4 * i}", f"convolutions.{4 * i + 1}") for i in range(len(self.convolutions) // 4))


def _fusible(norm: nn.Module, pool: nn.Module) -> bool:
    """Whether ``pool(norm(y))`` may run as :func:`batchnorm_maxpool3d` (no hooks would be skipped)."""
    return (
        type(norm) is nn.BatchNorm3d
        and norm.training
        and norm.track_running_stats
        and isinstance(pool, PadMaxPool3d)
        and pool.kernel_size == pool.stride == 2
        and not pool.explicit_pad
        and not any(m._forward_hooks or m._forward_pre_hooks for m in (norm, pool, pool.pool))
    )


def classifier_head_names(network: nn.Module) -> tuple[str, ...]:
    """Names of the submodules forming ``network``'s classifier head (used to select what fine-tuning trains)."""
    names = getattr(network, "head_modules", None)
    if not names:
        raise ValueError(f"{type(network).__name__} does not declare its classifier head (`head_modules`).")
    return tuple(names)


def feature_block_names(network: nn.Module) -> tuple[tuple[str, ...], ...]:
    """Module names of ``network``'s feature blocks, first to last, one tuple of names per block.

    Used to unfreeze "the last n blocks" on top of the classifier head in fine-tuning.
    """
    method = getattr(network, "block_modules", None)
    if not callable(method):
        raise ValueError(f"{type(network).__name__} does not declare its feature blocks (a `block_modules()` method).")
    # a plain method, not a property: TorchScript compiles properties but not unused methods
    return tuple(tuple(b) if not isinstance(b, str) else (b,) for b in method())


def set_batchnorm_momentum(network: nn.Module, momentum: float | None) -> nn.Module:
    """Set the running-statistics momentum of every BatchNorm layer of ``network`` (in place; returned).

    PyTorch's default, 0.1, averages the running mean and variance over about the last ten batches. With
    micro-batches of a few images that share one anatomy, the statistics used at evaluation then follow
    whichever heads came last; fine-tuning with e.g. 0.01 averages them over about a hundred batches.
    ``None`` leaves the network unchanged.
    """
    if momentum is None:
        return network
    if not 0.0 < momentum <= 1.0:
        raise ValueError(f"BatchNorm momentum must be in (0, 1], got {momentum}.")
    for module in network.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.momentum = momentum
    return network


class SqueezeExcitation3D(nn.Module):
    """Channel attention: global average pool -> Linear(C, C/r) -> ReLU -> Linear(C/r, C) -> sigmoid -> scale."""

    def __init__(self, channels: int, reduction: int = 8) -> None:
        super().__init__()
        hidden = max(1, channels // reduction)
        self.fc1 = nn.Linear(channels, hidden)
        self.fc2 = nn.Linear(hidden, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Rescale the channels of a (B, C, X, Y, Z) tensor by weights in (0, 1)."""
        w = torch.sigmoid(self.fc2(F.relu(self.fc1(x.mean(dim=(2, 3, 4))))))
        return x * w[:, :, None, None, None]


class ResidualBlock3D(nn.Module):
    """``Conv3d(k3, no bias) -> BN -> act -> Conv3d(k3, no bias) -> BN [-> SE] (+ 1x1x1 conv shortcut) -> act -> MaxPool3d(3, 2)``.

    The block of ClinicaDL's ResNet3D (ELU, no squeeze-excitation) and SE-CNN (ReLU, squeeze-excitation
    after the second BatchNorm, before the residual addition). A spatial size ``n`` becomes
    ``floor((n - 3) / 2) + 1``.
    """

    def __init__(self, in_channels: int, out_channels: int, act: str = "elu", squeeze_excitation: bool = False) -> None:
        super().__init__()
        act_type = Act[act]
        self.conv1 = nn.Conv3d(in_channels, out_channels, kernel_size=3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm3d(out_channels)
        self.act1 = act_type()
        self.conv2 = nn.Conv3d(out_channels, out_channels, kernel_size=3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm3d(out_channels)
        self.se_block = SqueezeExcitation3D(out_channels) if squeeze_excitation else None
        self.shortcut = nn.Sequential(nn.Conv3d(in_channels, out_channels, kernel_size=1, bias=False))
        self.act2 = act_type()
        self.pool = nn.MaxPool3d(kernel_size=3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C_in, X, Y, Z) -> (B, C_out, floor((X-3)/2)+1, ...)."""
        out = self.bn2(self.conv2(self.act1(self.bn1(self.conv1(x)))))
        if self.se_block is not None:
            out = self.se_block(out)
        return self.pool(self.act2(out + self.shortcut(x)))


class _ResidualCNN(nn.Module):
    """Shared skeleton of :class:`ResNet3D` and :class:`SECNN`: residual blocks, flatten, two-layer head."""

    head_modules: tuple[str, ...] = ("fc",)
    _act = "elu"
    _se = False

    def __init__(self, input_size: Sequence[int], in_channels: int, num_classes: int, channels: Sequence[int]) -> None:
        super().__init__()
        if len(input_size) != 3:
            raise ValueError(f"{type(self).__name__} expects a 3D input size, got {tuple(input_size)}.")
        self.input_size = tuple(int(s) for s in input_size)
        self.expected_spatial = list(self.input_size)
        reduced = list(self.input_size)
        for _ in channels:
            reduced = [(s - 3) // 2 + 1 for s in reduced]
        if min(reduced) < 1:
            raise ValueError(
                f"{type(self).__name__} with {len(channels)} blocks needs inputs of at least 63 voxels a side "
                f"(each block pools with kernel 3, stride 2); got {self.input_size}. Use fewer `channels` for small inputs."
            )
        blocks, prev = [], in_channels
        for ch in channels:
            blocks.append(ResidualBlock3D(prev, ch, act=self._act, squeeze_excitation=self._se))
            prev = ch
        self.features = nn.Sequential(*blocks)
        self.flattened_size = prev * math.prod(reduced)
        self.fc = self._head(self.flattened_size, num_classes)

    def _head(self, n_in: int, num_classes: int) -> nn.Sequential:
        raise NotImplementedError

    def block_modules(self) -> tuple[tuple[str, ...], ...]:
        return tuple((f"features.{i}",) for i in range(len(self.features)))

    @property
    def saliency_layer(self) -> str:
        """The layer Grad-CAM explains: the last residual block."""
        return f"features.{len(self.features) - 1}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map a (B, C, X, Y, Z) batch (X, Y, Z = ``input_size``) to (B, num_classes) logits."""
        if list(x.shape[2:]) != self.expected_spatial:
            raise ValueError(
                "this network was built for inputs of spatial size "
                + str(self.expected_spatial)
                + ", got "
                + str(list(x.shape[2:]))
                + "; set the network's input_size (config key `spatial_size`) to the image size."
            )
        return self.fc(self.features(x))


class ResNet3D(_ResidualCNN):
    """ClinicaDL's ResNet3D (Loizillon et al., METHOD.md §4.2).

    Five :class:`ResidualBlock3D` with ELU (channels 8, 16, 32, 64, 128), then ``Flatten ->
    Linear(n, 256) -> ELU -> Dropout(0.8) -> Linear(256, num_classes)``. At 1x169x208x179 the blocks
    give 128x4x5x4 = 10,240 features and the network has 3,517,314 parameters (body 895,104, head
    2,622,210). Head keys ``fc.1``, ``fc.4``; block keys ``features.{0..4}.*``.

    Args:
        input_size: spatial size (X, Y, Z) of the input (at least 63 a side with five blocks).
        in_channels: input channels. num_classes: output logits.
        dropout: dropout of the head (0.8 in ClinicaDL, which ignores its ``dropout`` argument here).
        channels: output channels of the blocks (fewer blocks allow smaller test inputs).
    """

    _act = "elu"
    _se = False

    def __init__(
        self,
        input_size: Sequence[int] = (169, 208, 179),
        in_channels: int = 1,
        num_classes: int = 2,
        dropout: float = 0.8,
        channels: Sequence[int] = (8, 16, 32, 64, 128),
    ) -> None:
        self._dropout = float(dropout)
        super().__init__(input_size, in_channels, num_classes, channels)

    def _head(self, n_in: int, num_classes: int) -> nn.Sequential:
        return nn.Sequential(
            nn.Flatten(), nn.Linear(n_in, 256), nn.ELU(), nn.Dropout(self._dropout), nn.Linear(256, num_classes)
        )


class SECNN(_ResidualCNN):
    """ClinicaDL's squeeze-excitation CNN (``SqueezeExcitationCNN`` / ``SE_CNN``, METHOD.md §4.3).

    Five :class:`ResidualBlock3D` with ReLU and a squeeze-excitation block (reduction 8) before the
    residual addition, then ``Flatten -> Dropout(0.5) -> Linear(n, 256) -> ReLU -> Linear(256,
    num_classes)``. At 1x169x208x179: 3,523,049 parameters (body 900,839, head 2,622,210). Head keys
    ``fc.2``, ``fc.4``.
    """

    _act = "relu"
    _se = True

    def __init__(
        self,
        input_size: Sequence[int] = (169, 208, 179),
        in_channels: int = 1,
        num_classes: int = 2,
        dropout: float = 0.5,
        channels: Sequence[int] = (8, 16, 32, 64, 128),
    ) -> None:
        self._dropout = float(dropout)
        super().__init__(input_size, in_channels, num_classes, channels)

    def _head(self, n_in: int, num_classes: int) -> nn.Sequential:
        return nn.Sequential(
            nn.Flatten(), nn.Dropout(self._dropout), nn.Linear(n_in, 256), nn.ReLU(), nn.Linear(256, num_classes)
        )


class ViT3D(nn.Module):
    """A 3D vision transformer with the patch layout of Loizillon et al.'s ViT (METHOD.md §4.4), on MONAI's ``ViT``.

    The input is cut into a grid of ``patch_grid`` non-overlapping patches (3x4x3 = 36 patches by
    default): the patch size is ``input_size // patch_grid`` per axis and the input is first cropped
    to ``patch_size * patch_grid`` voxels from the low-index corner. At 169x208x179 that is the
    authors' crop to 168x208x177 and patches of 56x52x59 voxels. Patches are embedded by a linear
    layer (``proj_type="perceptron"``), a learnable class token is prepended, ``num_layers`` pre-norm
    transformer blocks follow (no qkv bias, no dropout), and the class token goes through
    ``LayerNorm -> Linear(hidden_size, num_classes)``, returned as logits (no Tanh).

    Choices (documented in docs/transfer_learning.md): position embedding and class token are
    learnable (the "clean" port, MONAI's initialisation; the authors' GPU runs used fixed random
    tensors); the class token gets no position embedding (MONAI); the attention scale is
    ``head_dim**-0.5`` by default, or the authors' ``hidden_size**-0.5`` with ``attention_scale="model"``.
    At full size with the defaults: 226,367,490 parameters, of which 12,288 (the cross-attention
    LayerNorms MONAI allocates in every block) are unused.

    Args:
        input_size: spatial size (X, Y, Z) of the input.
        in_channels, num_classes: input channels and output logits.
        patch_grid: number of patches along X, Y, Z.
        hidden_size, mlp_dim, num_layers, num_heads: transformer dimensions (1024, 2048, 6, 16).
        dropout: dropout rate inside the transformer (0).
        attention_scale: ``"head"`` (head_dim^-1/2, standard) or ``"model"`` (hidden_size^-1/2, the authors').
    """

    head_modules: tuple[str, ...] = ("vit.norm", "vit.classification_head")

    #: no convolutional feature map for Grad-CAM: the QC job scores without saliency maps
    saliency_layer: str | None = None

    def __init__(
        self,
        input_size: Sequence[int] = (169, 208, 179),
        in_channels: int = 1,
        num_classes: int = 2,
        patch_grid: Sequence[int] = (3, 4, 3),
        hidden_size: int = 1024,
        mlp_dim: int = 2048,
        num_layers: int = 6,
        num_heads: int = 16,
        dropout: float = 0.0,
        attention_scale: str = "head",
    ) -> None:
        super().__init__()
        if len(input_size) != 3 or len(patch_grid) != 3:
            raise ValueError(
                f"ViT3D expects 3D input_size and patch_grid, got {tuple(input_size)}, {tuple(patch_grid)}."
            )
        self.input_size = tuple(int(s) for s in input_size)
        self.expected_spatial = list(self.input_size)
        self.patch_size = tuple(s // g for s, g in zip(self.input_size, patch_grid))
        if min(self.patch_size) < 1:
            raise ValueError(f"patch grid {tuple(patch_grid)} is finer than the input {self.input_size}.")
        self.crop_size = tuple(p * g for p, g in zip(self.patch_size, patch_grid))
        self.vit = ViT(
            in_channels=in_channels,
            img_size=self.crop_size,
            patch_size=self.patch_size,
            hidden_size=hidden_size,
            mlp_dim=mlp_dim,
            num_layers=num_layers,
            num_heads=num_heads,
            proj_type="perceptron",
            pos_embed_type="learnable",
            classification=True,
            num_classes=num_classes,
            dropout_rate=dropout,
            spatial_dims=3,
            post_activation=None,
            qkv_bias=False,
        )
        if attention_scale == "model":
            for block in self.vit.blocks:
                block.attn.scale = hidden_size**-0.5
        elif attention_scale != "head":
            raise ValueError(f"attention_scale must be 'head' or 'model', got {attention_scale!r}.")

    def block_modules(self) -> tuple[tuple[str, ...], ...]:
        return tuple((f"vit.blocks.{i}",) for i in range(len(self.vit.blocks)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map a (B, C, X, Y, Z) batch (X, Y, Z = ``input_size``) to (B, num_classes) logits."""
        if list(x.shape[2:]) != self.expected_spatial:
            raise ValueError(
                "ViT3D was built for inputs of spatial size "
                + str(self.expected_spatial)
                + ", got "
                + str(list(x.shape[2:]))
                + "; set the network's input_size (config key `spatial_size`) to the image size."
            )
        cx, cy, cz = self.crop_size
        logits, _ = self.vit(x[:, :, :cx, :cy, :cz])
        return logits
