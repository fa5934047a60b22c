"""Export the trained network to TorchScript (``models/model.ts``) and ONNX (``models/model.onnx``).

::

    python -m scripts.export --format torchscript     # = python -m monai.bundle ckpt_export, plus checks
    python -m scripts.export --format onnx            # torch.onnx.export (dynamo) + onnxruntime check

Both read ``network_def`` from ``configs/inference.yaml``, check ``models/model.pt`` against
``large_files.yml`` (:mod:`scripts.integrity`), export, then run the exported model and the PyTorch
model on the same random inputs and refuse the export (error, file removed) when their class
probabilities differ by more than ``atol`` (default 1e-4).

The exported models take ``image`` (B, 1, X, Y, Z) float32, intensity-normalised exactly as the
bundle's ``preprocessing`` does, and return ``pred`` (B, 2) **logits**, like ``network_def`` and
MONAI's ``ckpt_export``; ``softmax`` gives the probabilities of (no_motion, motion). The ONNX batch
size is dynamic; the spatial size is the one exported (default 169x208x179, ``--spatial_size`` for
other sizes). The ONNX file carries the bundle version and class names in its metadata.

TorchScript is deprecated from torch 2.10 on (it still works with torch 2.13, with warnings); ONNX
is the longer-lived format. ONNX export needs ``onnx``, ``onnxscript`` and, for the check,
``onnxruntime`` (``pip install onnx onnxscript onnxruntime``; none of them pulls another torch).
"""

from __future__ import annotations

import argparse
import json
import os
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.bundle import ConfigParser, ckpt_export

from scripts.integrity import verify_file

__all__ = ["load_network", "max_probability_difference", "export_torchscript", "export_onnx", "main"]

ATOL = 1e-4  # largest accepted difference of class probabilities between PyTorch and an export


def _paths(bundle_root: str | os.PathLike, config_file: str | None, ckpt_file: str | None) -> tuple[Path, Path, Path]:
    root = Path(bundle_root)
    config = Path(config_file) if config_file else root / "configs" / "inference.yaml"
    ckpt = Path(ckpt_file) if ckpt_file else root / "models" / "model.pt"
    return root, config, ckpt


def load_network(
    bundle_root: str | os.PathLike = ".",
    config_file: str | None = None,
    ckpt_file: str | None = None,
    spatial_size: Sequence[int] | None = None,
) -> torch.nn.Module:
    """``network_def`` of the inference config with the verified weights loaded, in eval mode, on CPU.

    Raises:
        FileNotFoundError: no weights.
        scripts.integrity.WeightIntegrityError: the weights differ from their published hash.
    """
    root, config, ckpt = _paths(bundle_root, config_file, ckpt_file)
    verify_file(ckpt, root)
    parser = ConfigParser()
    parser.read_config(str(config))
    parser["bundle_root"] = str(root)
    if spatial_size is not None:
        parser["spatial_size"] = [int(s) for s in spatial_size]
    net = parser.get_parsed_content("network_def")
    net.load_state_dict(torch.load(ckpt, map_location="cpu", weights_only=True))
    return net.eval()


def _input_shape(net: torch.nn.Module, batch: int) -> tuple[int, ...]:
    spatial = getattr(net, "input_size", None)
    if spatial is None:
        raise ValueError(f"{type(net).__name__} has no 'input_size'; cannot build an example input.")
    return (batch, 1, *spatial)


def max_probability_difference(
    reference: torch.nn.Module,
    exported: Callable[[np.ndarray], np.ndarray],
    batches: Sequence[int] = (1, 2),
    seed: int = 0,
) -> float:
    """Largest absolute difference of softmax probabilities between ``reference`` and ``exported``.

    ``exported`` maps a (B, 1, X, Y, Z) float32 array to (B, C) logits. Inputs are standard normal
    (the bundle's preprocessing ends with a z-score), one per batch size in ``batches``.
    """
    gen = torch.Generator().manual_seed(seed)
    worst = 0.0
    for batch in batches:
        x = torch.randn(_input_shape(reference, batch), generator=gen)
        with torch.no_grad():
            expected = torch.softmax(reference(x), dim=1)
        got = torch.softmax(torch.as_tensor(np.asarray(exported(x.numpy()))), dim=1)
        if got.shape != expected.shape:
            raise ValueError(f"Exported model returned shape {tuple(got.shape)}, expected {tuple(expected.shape)}.")
        worst = max(worst, float((got - expected).abs().max()))
    return worst


def _check(path: Path, diff: float, atol: float) -> float:
    if not diff <= atol:  # also catches NaN
        path.unlink(missing_ok=True)
        raise RuntimeError(
            f"Export {path} differs from the PyTorch model by {diff:.3g} in probability (> {atol}); removed."
        )
    return diff


def export_torchscript(
    bundle_root: str | os.PathLike = ".",
    filepath: str | None = None,
    config_file: str | None = None,
    ckpt_file: str | None = None,
    spatial_size: Sequence[int] | None = None,
    atol: float = ATOL,
) -> tuple[Path, float]:
    """``monai.bundle.ckpt_export`` of ``network_def`` (configs and metadata embedded), then checked.

    Returns:
        The ``.ts`` path and the largest probability difference to PyTorch.
    """
    root, config, ckpt = _paths(bundle_root, config_file, ckpt_file)
    net = load_network(root, str(config), str(ckpt), spatial_size)  # verifies the weights first
    out = Path(filepath) if filepath else root / "models" / "model.ts"
    override: dict[str, Any] = {"bundle_root": str(root)}
    if spatial_size is not None:
        override["spatial_size"] = [int(s) for s in spatial_size]
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*torch\.jit.*deprecated", category=DeprecationWarning)
        ckpt_export(
            net_id="network_def",
            filepath=str(out),
            ckpt_file=str(ckpt),
            meta_file=str(config.parent / "metadata.json"),
            config_file=str(config),
            **override,
        )
        scripted = torch.jit.load(str(out), map_location="cpu").eval()

    def run(x: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return scripted(torch.from_numpy(x)).numpy()

    return out, _check(out, max_probability_difference(net, run), atol)


def export_onnx(
    bundle_root: str | os.PathLike = ".",
    filepath: str | None = None,
    config_file: str | None = None,
    ckpt_file: str | None = None,
    spatial_size: Sequence[int] | None = None,
    dynamo: bool = True,
    atol: float = ATOL,
) -> tuple[Path, float]:
    """``torch.onnx.export`` of ``network_def`` (dynamic batch), checked with onnxruntime.

    Args:
        dynamo: use the torch.export-based exporter (default, needs ``onnxscript``); False uses the
            legacy TorchScript-based exporter.

    Returns:
        The ``.onnx`` path and the largest probability difference to PyTorch.
    """
    import onnx  # optional dependency, imported here so that the rest of the bundle works without it
    import onnxruntime as ort

    root, config, ckpt = _paths(bundle_root, config_file, ckpt_file)
    net = load_network(root, str(config), str(ckpt), spatial_size)
    out = Path(filepath) if filepath else root / "models" / "model.onnx"
    out.parent.mkdir(parents=True, exist_ok=True)
    example = (torch.zeros(_input_shape(net, 2)),)
    names = {"input_names": ["image"], "output_names": ["pred"]}
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # exporter chatter (deprecations, opset notes)
        if dynamo:
            batch = torch.export.Dim("batch", min=1, max=1024)
            torch.onnx.export(
                net,
                example,
                str(out),
                dynamo=True,
                external_data=False,
                dynamic_shapes=({0: batch},),
                verbose=False,
                **names,
            )
        else:
            torch.onnx.export(
                net,
                example,
                str(out),
                dynamo=False,
                dynamic_axes={"image": {0: "batch"}, "pred": {0: "batch"}},
                **names,
            )

    model = onnx.load(str(out))
    meta = json.loads((config.parent / "metadata.json").read_text())
    props = {
        "bundle_version": meta.get("version", ""),
        "output": "logits; softmax over dim 1 gives class probabilities",
        "channel_def": json.dumps(meta["network_data_format"]["outputs"]["pred"].get("channel_def", {})),
    }
    for key, value in props.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.save(model, str(out))

    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    input_name = session.get_inputs()[0].name

    def run(x: np.ndarray) -> np.ndarray:
        return session.run(None, {input_name: x})[0]

    return out, _check(out, max_probability_difference(net, run), atol)


def main(argv: Sequence[str] | None = None) -> tuple[Path, float]:
    """Command-line entry point (``python -m scripts.export --help``)."""
    parser = argparse.ArgumentParser(prog="python -m scripts.export", description=__doc__.split("\n\n")[0])
    parser.add_argument("--format", choices=("torchscript", "onnx"), required=True)
    parser.add_argument("--bundle_root", default=".")
    parser.add_argument("--filepath", default=None, help="output file (default models/model.ts or models/model.onnx)")
    parser.add_argument("--config_file", default=None, help="default configs/inference.yaml")
    parser.add_argument("--ckpt_file", default=None, help="default models/model.pt")
    parser.add_argument("--spatial_size", type=int, nargs=3, default=None, help="X Y Z (default from the config)")
    parser.add_argument("--legacy", action="store_true", help="ONNX: legacy TorchScript-based exporter")
    parser.add_argument("--atol", type=float, default=ATOL, help="accepted probability difference (default 1e-4)")
    args = parser.parse_args(argv)
    common = dict(
        bundle_root=args.bundle_root,
        filepath=args.filepath,
        config_file=args.config_file,
        ckpt_file=args.ckpt_file,
        spatial_size=args.spatial_size,
        atol=args.atol,
    )
    if args.format == "torchscript":
        out, diff = export_torchscript(**common)
    else:
        out, diff = export_onnx(dynamo=not args.legacy, **common)
    print(f"{out}: max |p_export - p_pytorch| = {diff:.2e}")
    return out, diff


if __name__ == "__main__":
    main()
