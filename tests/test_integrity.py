"""Tests of scripts.integrity: hashes from large_files.yml checked when weights are loaded."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from ignite.engine import Engine
from monai.bundle import ConfigWorkflow

from conftest import BUNDLE_ROOT, SMALL_SHAPE
from ecosystem_helpers import save_small_model
from scripts.integrity import (
    VerifiedCheckpointLoader,
    WeightIntegrityError,
    expected_hash,
    file_hash,
    read_large_files,
    verify_file,
)
from scripts.networks import Conv5FC3

SHA256_ABC = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"


def _bundle(tmp_path: Path, content: bytes = b"abc", **entry) -> Path:
    (tmp_path / "models").mkdir(exist_ok=True)
    (tmp_path / "models" / "model.pt").write_bytes(content)
    spec = {"large_files": [{"path": "models/model.pt", "url": "https://example.org/model.pt", **entry}]}
    (tmp_path / "large_files.yml").write_text(yaml.safe_dump(spec))
    return tmp_path / "models" / "model.pt"


def test_file_hash_known_answers(tmp_path):
    f = tmp_path / "x"
    f.write_bytes(b"abc")
    assert file_hash(f) == SHA256_ABC
    assert file_hash(f, "MD5") == "900150983cd24fb0d6963f7d28e17f72"
    with pytest.raises(ValueError, match="Unsupported hash_type"):
        file_hash(f, "crc32")


def test_matching_hash_passes_and_missing_hash_is_unchecked(tmp_path):
    weights = _bundle(tmp_path, hash_val=SHA256_ABC.upper(), hash_type="sha256")
    assert verify_file(weights, tmp_path) is True
    weights = _bundle(tmp_path)  # entry without hash_val
    assert verify_file(weights, tmp_path) is False
    (tmp_path / "large_files.yml").unlink()  # no large_files.yml at all
    assert verify_file(weights, tmp_path) is False
    other = tmp_path / "models" / "other.pt"
    other.write_bytes(b"zzz")
    _bundle(tmp_path, hash_val=SHA256_ABC, hash_type="sha256")
    assert verify_file(other, tmp_path) is False  # not listed


def test_tampered_file_is_refused_with_a_clear_message(tmp_path):
    weights = _bundle(tmp_path, content=b"abd", hash_val=SHA256_ABC, hash_type="sha256")
    with pytest.raises(WeightIntegrityError) as err:
        verify_file(weights, tmp_path)
    message = str(err.value)
    assert str(weights) in message and SHA256_ABC in message and file_hash(weights) in message
    assert "large_files.yml" in message


def test_json_large_files_and_md5_default(tmp_path):
    weights = _bundle(tmp_path)
    (tmp_path / "large_files.yml").unlink()
    spec = {"large_files": [{"path": "models/model.pt", "url": "u", "hash_val": "900150983cd24fb0d6963f7d28e17f72"}]}
    (tmp_path / "large_files.json").write_text(json.dumps(spec))
    assert expected_hash(weights, tmp_path)[1] == "md5"  # MONAI's default hash type
    assert verify_file(weights, tmp_path) is True


def test_malformed_large_files_are_reported(tmp_path):
    bad = tmp_path / "large_files.yml"
    bad.write_text("large_files: {path: x}\n")
    with pytest.raises(ValueError, match="large_files' list"):
        read_large_files(bad)
    bad.write_text("large_files:\n  - url: u\n")
    with pytest.raises(ValueError, match="entry 0 has no 'path'"):
        read_large_files(bad)
    bad.write_text("large_files:\n  - {path: a, hash_val: ff, hash_type: crc32}\n")
    with pytest.raises(ValueError, match="unsupported hash_type"):
        read_large_files(bad)
    bad.write_text("large_files:\n  - {path: a, hash_val: 0123, hash_type: md5}\n")  # YAML reads an int
    with pytest.raises(ValueError, match="not a string; quote it"):
        read_large_files(bad)
    with pytest.raises(FileNotFoundError):
        verify_file(tmp_path / "missing.pt", tmp_path)


def test_verified_checkpoint_loader_loads_or_refuses(tmp_path):
    weights = tmp_path / "models" / "model.pt"
    source = save_small_model(weights, seed=1)
    spec = {"large_files": [{"path": "models/model.pt", "url": "u", "hash_val": file_hash(weights), "hash_type": "sha256"}]}
    (tmp_path / "large_files.yml").write_text(yaml.safe_dump(spec))

    target = Conv5FC3(input_size=SMALL_SHAPE)
    engine = Engine(lambda e, b: None)
    VerifiedCheckpointLoader(load_path=str(weights), load_dict={"model": target}, bundle_root=str(tmp_path))(engine)
    assert torch.equal(target.state_dict()["fc.6.weight"], source.state_dict()["fc.6.weight"])

    save_small_model(weights, seed=2)  # same size, other values
    with pytest.raises(WeightIntegrityError, match="failed its integrity check"):
        VerifiedCheckpointLoader(load_path=str(weights), load_dict={"model": target}, bundle_root=str(tmp_path))(engine)


def test_inference_config_refuses_tampered_weights(small_demo, tmp_path):
    weights = tmp_path / "models" / "model.pt"
    save_small_model(weights, seed=3)
    spec = {"large_files": [{"path": "models/model.pt", "url": "u", "hash_val": file_hash(weights), "hash_type": "sha256"}]}
    (tmp_path / "large_files.yml").write_text(yaml.safe_dump(spec))
    scan = sorted(small_demo.rglob("*.nii.gz"))[0]

    def run() -> None:
        wf = ConfigWorkflow(
            config_file=str(BUNDLE_ROOT / "configs" / "inference.yaml"),
            meta_file=str(BUNDLE_ROOT / "configs" / "metadata.json"),
            workflow_type="infer",
            bundle_root=str(tmp_path),
            input=str(scan),
            spatial_size=list(SMALL_SHAPE),
            num_workers=0,
        )
        wf.initialize()
        wf.run()
        wf.finalize()

    run()  # genuine weights: runs and writes the table
    assert (tmp_path / "eval" / "inference" / "qc.tsv").is_file()
    state = torch.load(weights, weights_only=True)
    state["fc.6.bias"] += 1.0
    torch.save(state, weights)
    with pytest.raises(Exception) as err:  # MONAI wraps errors raised inside config expressions
        run()
    chain, exc = [], err.value
    while exc is not None:
        chain.append(exc)
        exc = exc.__cause__ or exc.__context__
    refused = [e for e in chain if isinstance(e, WeightIntegrityError)]
    assert refused and str(weights) in str(refused[0])
