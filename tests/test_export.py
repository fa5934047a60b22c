"""Tests of scripts.export: TorchScript and ONNX exports give the PyTorch model's probabilities."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from conftest import BUNDLE_ROOT, SMALL_SHAPE
from ecosystem_helpers import save_small_model
from scripts.export import (
    export_onnx,
    export_torchscript,
    load_network,
    main,
    max_probability_difference,
)
from scripts.integrity import WeightIntegrityError, file_hash

CONFIG = str(BUNDLE_ROOT / "configs" / "inference.yaml")


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    """A bundle root holding a freshly initialised small Conv5FC3 with non-trivial BatchNorm statistics."""
    root = tmp_path_factory.mktemp("export_bundle")
    save_small_model(root / "models" / "model.pt", seed=11)
    return root


def _reference(bundle: Path, x: torch.Tensor) -> np.ndarray:
    net = load_network(bundle, CONFIG, spatial_size=SMALL_SHAPE)
    with torch.no_grad():
        return torch.softmax(net(x), dim=1).numpy()


def test_torchscript_matches_pytorch(bundle, tmp_path):
    out, diff = export_torchscript(bundle, str(tmp_path / "model.ts"), CONFIG, spatial_size=SMALL_SHAPE)
    assert diff <= 1e-4
    with zipfile.ZipFile(out) as zf:  # ckpt_export embeds the metadata and the config
        assert any(n.endswith("extra/metadata.json") for n in zf.namelist())
    scripted = torch.jit.load(str(out))
    x = torch.randn(3, 1, *SMALL_SHAPE, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        got = torch.softmax(scripted(x), dim=1).numpy()
    np.testing.assert_allclose(got, _reference(bundle, x), atol=1e-4, rtol=0)


@pytest.mark.parametrize("dynamo", [True, False], ids=["dynamo", "legacy"])
def test_onnx_matches_pytorch(bundle, tmp_path, dynamo):
    pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    if dynamo:
        pytest.importorskip("onnxscript")
    out, diff = export_onnx(bundle, str(tmp_path / "model.onnx"), CONFIG, spatial_size=SMALL_SHAPE, dynamo=dynamo)
    assert diff <= 1e-4
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["image"] and [o.name for o in session.get_outputs()] == ["pred"]
    meta = session.get_modelmeta().custom_metadata_map
    assert json.loads(meta["channel_def"]) == {"0": "no_motion", "1": "motion"}
    x = torch.randn(3, 1, *SMALL_SHAPE, generator=torch.Generator().manual_seed(6))  # batch size not exported
    logits = session.run(None, {"image": x.numpy()})[0]
    got = torch.softmax(torch.from_numpy(logits), dim=1).numpy()
    np.testing.assert_allclose(got, _reference(bundle, x), atol=1e-4, rtol=0)


def test_a_wrong_export_is_detected_and_removed(bundle, tmp_path):
    net = load_network(bundle, CONFIG, spatial_size=SMALL_SHAPE)

    def exact(x):
        with torch.no_grad():
            return net(torch.from_numpy(x)).numpy()

    assert max_probability_difference(net, exact) == 0.0
    shifted = max_probability_difference(net, lambda x: exact(x) + np.array([0.0, 0.5], dtype=np.float32))
    assert shifted > 0.05  # a logit shift of 0.5 moves the probabilities by ~0.12 around p=0.5


def test_cli_and_tampered_weights(bundle, tmp_path):
    out, diff = main(["--format", "torchscript", "--bundle_root", str(bundle), "--config_file", CONFIG,
                      "--filepath", str(tmp_path / "m.ts"), "--spatial_size", *map(str, SMALL_SHAPE)])
    assert out.is_file() and diff <= 1e-4
    weights = bundle / "models" / "model.pt"
    spec = {"large_files": [{"path": "models/model.pt", "url": "u", "hash_val": "0" * 64, "hash_type": "sha256"}]}
    (bundle / "large_files.yml").write_text(yaml.safe_dump(spec))
    try:
        with pytest.raises(WeightIntegrityError, match=str(weights)):
            export_torchscript(bundle, str(tmp_path / "x.ts"), CONFIG, spatial_size=SMALL_SHAPE)
        assert not (tmp_path / "x.ts").exists()
        spec["large_files"][0]["hash_val"] = file_hash(weights)
        (bundle / "large_files.yml").write_text(yaml.safe_dump(spec))
        assert load_network(bundle, CONFIG, spatial_size=SMALL_SHAPE) is not None
    finally:
        (bundle / "large_files.yml").unlink()
