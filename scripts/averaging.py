"""Average the weights of several checkpoints of one run and recompute the BatchNorm statistics.

    python -m scripts.averaging --checkpoints runs/snaps/it0*.pt --out runs/averaged.pt --batches 48

Fine-tuning with micro-batches of a few images moves the weights by noise from one validation to the
next (the validation loss of the pre-training runs went up and down by 0.1 between checks 48 iterations
apart). Averaging the weights of the last checkpoints of a run (stochastic weight averaging, Izmailov et
al. 2018) takes the centre of that noise. The averaged convolutions no longer match any checkpoint's
BatchNorm running statistics, and running statistics with PyTorch's momentum follow the last few
micro-batches anyway; they are recomputed as plain averages over ``batches`` training micro-batches
drawn from the run's own generator (``torch.optim.swa_utils.update_bn``: statistics reset, momentum
``None``, the network in training mode under ``no_grad``).

The micro-batches are made as in training (``PairedPrepareBatch``: the clean and the moved image of one
head never share a forward pass), from the configs given (by default the pre-training overlay) with a
seed of their own, so they are heads that neither training nor validation drew.
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from scripts.common.files import atomic_write
from scripts.ship import read_state

__all__ = ["average_states", "recalibrate_batchnorm", "training_batches", "average_and_recalibrate"]

logger = logging.getLogger(__name__)
_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CONFIGS = (str(_ROOT / "configs" / "train.yaml"), str(_ROOT / "configs" / "pretrain.yaml"))


def average_states(states: Sequence[Mapping[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The element-wise mean of floating-point tensors of ``states`` (same keys and shapes), in float32.

    Integer tensors (BatchNorm's ``num_batches_tracked``) take their largest value; they are not weights.
    """
    if not states:
        raise ValueError("average_states needs at least one state dict")
    keys = list(states[0])
    for i, state in enumerate(states[1:], start=1):
        if list(state) != keys:
            raise ValueError(f"state {i} has other keys than state 0: {sorted(set(state) ^ set(keys))[:5]}")
    out: dict[str, torch.Tensor] = {}
    for key in keys:
        values = [s[key] for s in states]
        shapes = {tuple(v.shape) for v in values}
        if len(shapes) != 1:
            raise ValueError(f"{key}: shapes differ between states: {sorted(shapes)}")
        if values[0].is_floating_point():
            out[key] = torch.stack([v.float() for v in values]).mean(0)
        else:
            out[key] = torch.stack(values).amax(0)
    return out


def recalibrate_batchnorm(network: nn.Module, batches: Iterable[torch.Tensor]) -> nn.Module:
    """Recompute every BatchNorm running mean and variance of ``network`` as averages over ``batches``.

    The network's training/eval mode and the momenta are restored afterwards; returns ``network``.
    Raises ``ValueError`` when ``batches`` is empty (the statistics would be left reset).
    """
    batches = iter(batches)
    first = next(batches, None)
    if first is None:
        raise ValueError("recalibrate_batchnorm: no batches were given")
    torch.optim.swa_utils.update_bn(itertools.chain([first], batches), network)
    return network


def training_batches(
    config_files: Sequence[str] = DEFAULT_CONFIGS, seed: int = 1000, overrides: Mapping[str, Any] | None = None
) -> tuple[nn.Module, Iterator[torch.Tensor]]:
    """The configs' ``network`` and an endless iterator of training micro-batches (images only)."""
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(list(config_files))
    parser["bundle_root"] = str(_ROOT)
    parser.update({"seed": seed, **dict(overrides or {})})
    network = parser.get_parsed_content("network")
    loader = parser.get_parsed_content("train#dataloader")
    prepare = parser.get_parsed_content("train#trainer#prepare_batch")

    def images() -> Iterator[torch.Tensor]:
        while True:
            for batch in loader:
                yield prepare(batch)[0]

    return network, images()


def average_and_recalibrate(
    checkpoints: Sequence[str | os.PathLike],
    out: str | os.PathLike,
    batches: int = 48,
    config_files: Sequence[str] = DEFAULT_CONFIGS,
    seed: int = 1000,
    overrides: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Average ``checkpoints``, recompute BatchNorm over ``batches`` micro-batches, save the state to ``out``."""
    if not checkpoints:
        raise ValueError("no checkpoints to average")
    state = average_states([read_state(p) for p in checkpoints])
    network, images = training_batches(config_files, seed=seed, overrides=overrides)
    network.load_state_dict(state)
    if batches > 0:
        recalibrate_batchnorm(network, itertools.islice(images, batches))
    final = {k: v.detach().clone().contiguous() for k, v in network.state_dict().items()}
    atomic_write(out, lambda tmp: torch.save(final, tmp))
    summary = {
        "checkpoints": [str(p) for p in checkpoints],
        "batches": int(batches),
        "seed": int(seed),
        "out": str(out),
    }
    logger.info("averaged %d checkpoints, BatchNorm over %d micro-batches -> %s", len(checkpoints), batches, out)
    return summary


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoints", nargs="+", required=True, help="training checkpoints or state dicts")
    parser.add_argument("--out", required=True, help="where to save the averaged state dict")
    parser.add_argument("--batches", type=int, default=48, help="micro-batches for the BatchNorm statistics (0: keep)")
    parser.add_argument("--config_files", nargs="+", default=list(DEFAULT_CONFIGS))
    parser.add_argument("--seed", type=int, default=1000, help="generator seed of the recalibration heads")
    parser.add_argument("--override", default="{}", help="JSON dict of config overrides, e.g. '{\"voxel_size\": 4}'")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    summary = average_and_recalibrate(
        args.checkpoints, args.out, args.batches, args.config_files, args.seed, json.loads(args.override)
    )
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
