"""Transfer learning: loading pre-trained weights, freezing all but the classifier head, BatchNorm mode
(the cross-validation driver is :mod:`scripts.cross_validation`; rater agreement is configs/agreement.yaml).

Fine-tuning (configs/finetune.yaml) calls :func:`prepare_finetuning` on the freshly built network:
load the stage-1 state dict, set ``requires_grad`` so that only the classifier head (selected by
module name, :func:`scripts.networks.classifier_head_names`) and optionally the last ``n`` feature
blocks train, and choose whether BatchNorm running statistics keep updating (``bn_mode="update"``,
what the authors' code did because the whole model was in train mode) or stay at their pre-trained
values (``bn_mode="frozen"``). The optimiser in train.yaml already receives only parameters with
``requires_grad``.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from torch import nn

from scripts.networks import classifier_head_names, feature_block_names

__all__ = [
    "BN_MODES",
    "load_pretrained",
    "freeze_all_but",
    "freeze_batchnorm_statistics",
    "trainable_module_names",
    "prepare_finetuning",
    "count_parameters",
]

logger = logging.getLogger(__name__)

BN_MODES = ("update", "frozen")
_BN_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)


def load_pretrained(
    network: nn.Module,
    path: str | os.PathLike,
    strict: bool = True,
    skip_mismatched: bool = False,
    map_location: str | torch.device = "cpu",
) -> nn.Module:
    """Load a plain state dict (``models/model.pt``, ``weights_only=True``) into ``network``.

    Args:
        network: the freshly built network.
        path: the state dict file (a dict of tensors, or a dict with a ``model`` / ``state_dict`` entry).
        strict: every key must match (as ClinicaDL's CNN-to-CNN transfer did).
        skip_mismatched: leave out tensors whose shape differs (e.g. a head with another number of
            classes); they keep their fresh initialisation. Implies non-strict loading of those keys.
        map_location: where tensors are loaded.

    Raises:
        FileNotFoundError: no file at ``path``. ValueError: the file holds no state dict, or keys or
        shapes do not match (the message lists them).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"pre-trained weights {path} do not exist; run stage 1 (configs/train.yaml) first or set `pretrained_path`."
        )
    state = torch.load(path, map_location=map_location, weights_only=True)
    if isinstance(state, Mapping) and not any(isinstance(v, torch.Tensor) for v in state.values()):
        state = state.get("model", state.get("state_dict", state))
    if not isinstance(state, Mapping):
        raise ValueError(f"{path} does not hold a state dict.")
    own = network.state_dict()
    if skip_mismatched:
        skipped = [k for k, v in state.items() if k in own and tuple(own[k].shape) != tuple(v.shape)]
        state = {k: v for k, v in state.items() if k not in skipped}
        if skipped:
            logger.info("not loading %d tensors of other shape: %s", len(skipped), skipped)
    else:
        wrong = [
            f"{k} {tuple(v.shape)} vs {tuple(own[k].shape)}"
            for k, v in state.items()
            if k in own and own[k].shape != v.shape
        ]
        if wrong:
            raise ValueError(
                f"{path}: tensors of other shape than the network's (was it trained at another spatial_size?): {wrong[:5]}"
            )
    result = network.load_state_dict(state, strict=strict and not skip_mismatched)
    if strict and not skip_mismatched and (result.missing_keys or result.unexpected_keys):
        raise ValueError(
            f"{path}: missing keys {result.missing_keys[:5]}, unexpected keys {result.unexpected_keys[:5]}"
        )
    logger.info("loaded pre-trained weights from %s", path)
    return network


def _is_under(name: str, prefixes: Sequence[str]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def freeze_all_but(network: nn.Module, trainable: Sequence[str]) -> list[str]:
    """Set ``requires_grad`` True for the parameters under the modules named in ``trainable``, False elsewhere.

    Returns the names of the trainable parameters. Raises ValueError if a name is not a submodule.
    """
    modules = dict(network.named_modules())
    unknown = [n for n in trainable if n not in modules]
    if unknown:
        raise ValueError(
            f"{type(network).__name__} has no submodule(s) {unknown}; its modules include {list(modules)[1:12]}."
        )
    names = []
    for name, param in network.named_parameters():
        param.requires_grad_(_is_under(name, trainable))
        if param.requires_grad:
            names.append(name)
    return names


def _eval_only_train(self: nn.Module, mode: bool = True) -> nn.Module:
    """``train()`` of a BatchNorm whose statistics are frozen: the layer always stays in eval mode."""
    return nn.Module.train(self, False)


_FROZEN_BN_CLASSES: dict[type, type] = {}


def freeze_batchnorm_statistics(network: nn.Module, exclude: Sequence[str] = ()) -> list[str]:
    """Keep BatchNorm layers (outside the modules in ``exclude``) in eval mode, even under ``network.train()``.

    Their running mean and variance then stay at the pre-trained values and normalisation uses them
    in training too. Implemented by switching each layer to a subclass whose ``train()`` always
    selects eval mode, so state-dict keys and pickling are unchanged. Returns the layers' names.
    """
    names = []
    for name, module in network.named_modules():
        if isinstance(module, _BN_TYPES) and not _is_under(name, exclude):
            cls = type(module)
            if cls not in _FROZEN_BN_CLASSES.values():
                frozen = _FROZEN_BN_CLASSES.setdefault(
                    cls, type(f"StatsFrozen{cls.__name__}", (cls,), {"train": _eval_only_train})
                )
                module.__class__ = frozen
            module.train(False)
            names.append(name)
    return names


def trainable_module_names(
    network: nn.Module, trainable: Sequence[str] | None = None, n_last_blocks: int = 0
) -> tuple[str, ...]:
    """Modules to train: ``trainable`` (default: the network's classifier head) plus its last ``n_last_blocks`` feature blocks."""
    names = list(trainable) if trainable else list(classifier_head_names(network))
    if n_last_blocks:
        blocks = feature_block_names(network)
        if n_last_blocks > len(blocks):
            raise ValueError(f"n_last_blocks={n_last_blocks} but {type(network).__name__} has {len(blocks)} blocks.")
        for block in blocks[len(blocks) - n_last_blocks :]:
            names.extend(block)
    return tuple(names)


def prepare_finetuning(
    network: nn.Module,
    pretrained_path: str | os.PathLike | None = None,
    trainable: Sequence[str] | None = None,
    n_last_blocks: int = 0,
    bn_mode: str = "update",
    full: bool = False,
    skip_mismatched: bool = False,
) -> nn.Module:
    """Load stage-1 weights into ``network`` and freeze everything but the classifier head.

    Args:
        network: the network built from ``network_def``.
        pretrained_path: stage-1 state dict; None trains from the fresh initialisation (the
            "from scratch" row; use it with ``full=True``).
        trainable: module names to train; default: the network's classifier head (``head_modules``;
            Conv5FC3: ``fc``, its three linear layers).
        n_last_blocks: also train the last n feature blocks.
        bn_mode: ``"update"`` (default, as the authors' code: BatchNorm running statistics keep
            updating in training although BN weights are frozen) or ``"frozen"`` (BN layers outside
            the trained modules stay in eval mode).
        full: train every parameter (full fine-tuning / training from scratch); ``trainable`` and
            ``n_last_blocks`` are then ignored.
        skip_mismatched: see :func:`load_pretrained`.

    Returns:
        the same network, ready for ``[p for p in network.parameters() if p.requires_grad]``.
    """
    if bn_mode not in BN_MODES:
        raise ValueError(f"bn_mode must be one of {BN_MODES}, got {bn_mode!r}.")
    if pretrained_path:
        load_pretrained(network, pretrained_path, skip_mismatched=skip_mismatched)
    if full:
        for p in network.parameters():
            p.requires_grad_(True)
        modules: tuple[str, ...] = ("",)
    else:
        modules = trainable_module_names(network, trainable, n_last_blocks)
        freeze_all_but(network, modules)
    if bn_mode == "frozen" and not full:
        freeze_batchnorm_statistics(network, exclude=modules)
    n_train, n_all = count_parameters(network, trainable_only=True), count_parameters(network)
    logger.info(
        "fine-tuning %s: %d of %d parameters trainable (%s), BatchNorm statistics %s",
        type(network).__name__,
        n_train,
        n_all,
        "all" if full else ", ".join(modules),
        bn_mode,
    )
    return network


def count_parameters(network: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameters (optionally only those with ``requires_grad``)."""
    return sum(p.numel() for p in network.parameters() if p.requires_grad or not trainable_only)
