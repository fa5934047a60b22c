"""Tests of scripts.package: the release zip, served on 127.0.0.1 and fetched with monai.bundle download."""

from __future__ import annotations

import csv
import functools
import json
import subprocess
import sys
import threading
import zipfile
from collections.abc import Iterator
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml
from monai.bundle import ConfigWorkflow

from conftest import BUNDLE_ROOT, SMALL_SHAPE
from ecosystem_helpers import save_small_model, unpublished_bundle
from scripts.integrity import WeightIntegrityError, file_hash, verify_file
from scripts.package import BUNDLE_NAME, build_package, bundle_files, bundle_version, main, zip_name

VERSION = bundle_version(BUNDLE_ROOT)
SMALL = str(list(SMALL_SHAPE))


class _QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, format, *args):  # noqa: A002 - keep pytest output clean
        pass


@pytest.fixture
def http_dir(tmp_path) -> Iterator[tuple[Path, str]]:
    """A folder served over HTTP on 127.0.0.1 (random port) for the duration of one test."""
    root = tmp_path / "served"
    root.mkdir()
    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_QuietHandler, directory=str(root)))
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)
    thread.start()
    try:
        yield root, f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


@pytest.fixture(scope="module")
def small_weights(tmp_path_factory) -> Path:
    """A freshly initialised small Conv5FC3 (43x52x45 input) as a plain state dict."""
    path = tmp_path_factory.mktemp("weights") / "model.pt"
    save_small_model(path, seed=7)
    return path


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    """The bundle's sources without the shipped weights: packaging other weights needs no published hash."""
    return unpublished_bundle(tmp_path_factory.mktemp("source") / "bundle")


def _run_bundle(*args: str, cwd: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "monai.bundle", *args], cwd=cwd, capture_output=True, text=True, encoding="utf-8", errors="replace", timeout=600)
    assert proc.returncode == 0, f"monai.bundle {args[0]} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"


def _probabilities(tsv_path: Path) -> dict[str, float]:
    with tsv_path.open() as f:
        return {Path(r["path"]).name: float(r["prob_motion"]) for r in csv.DictReader(f, delimiter="\t")}


def test_zip_layout_and_reproducibility(source, small_weights, tmp_path):
    out = build_package(source, tmp_path / "a", weights=small_weights)
    assert out.name == f"{BUNDLE_NAME}_v{VERSION}.zip" == zip_name(VERSION)
    with zipfile.ZipFile(out) as zf:
        names = zf.namelist()
        assert all(n.startswith(f"{BUNDLE_NAME}/") for n in names)
        inner = {n[len(BUNDLE_NAME) + 1 :] for n in names}
        assert {"LICENSE", "configs/metadata.json", "configs/inference.yaml", "scripts/__init__.py", "models/model.pt"} <= inner
        assert "docs/README.md" in inner and "scripts/networks.py" in inner
        assert not any(n.startswith(("tests/", "apps/", ".ci/", "data/", "eval/")) or "__pycache__" in n for n in inner)
        assert "README.md" not in inner and "large_files.yml" not in inner  # weights shipped, nothing to fetch
        assert zf.read(f"{BUNDLE_NAME}/models/model.pt") == small_weights.read_bytes()
        assert json.loads(zf.read(f"{BUNDLE_NAME}/configs/metadata.json"))["version"] == VERSION
    again = build_package(source, tmp_path / "b", weights=small_weights)
    assert file_hash(again) == file_hash(out)  # same inputs, same bytes


def test_released_file_list_matches_the_repository():
    arcs = [arc for _, arc in bundle_files(BUNDLE_ROOT)]
    assert arcs == sorted(arcs) and "LICENSE" in arcs
    expected_py = sorted(p.relative_to(BUNDLE_ROOT).as_posix() for p in (BUNDLE_ROOT / "scripts").rglob("*.py"))
    assert [a for a in arcs if a.startswith("scripts/")] == expected_py


def test_version_must_be_in_changelog(tmp_path):
    (tmp_path / "configs").mkdir()
    meta = {"version": "9.9.9", "changelog": {"0.1.0": "first"}}
    (tmp_path / "configs" / "metadata.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="9.9.9 has no entry in 'changelog'"):
        bundle_version(tmp_path)


def test_excluding_weights_needs_a_url_and_writes_sha256(source, small_weights, tmp_path):
    with pytest.raises(ValueError, match="needs --weights_url"):
        build_package(source, tmp_path, weights=small_weights, exclude_weights=True)
    with pytest.raises(FileNotFoundError, match="not found"):
        build_package(source, tmp_path, weights=tmp_path / "missing.pt")
    out = main(["--bundle_root", str(source), "--output_dir", str(tmp_path), "--weights", str(small_weights),
                "--exclude_weights", "--weights_url", "https://example.org/model.pt"])
    with zipfile.ZipFile(out) as zf:
        assert f"{BUNDLE_NAME}/models/model.pt" not in zf.namelist()
        spec = yaml.safe_load(zf.read(f"{BUNDLE_NAME}/large_files.yml"))
    assert spec == {"large_files": [{"path": "models/model.pt", "url": "https://example.org/model.pt",
                                     "hash_val": file_hash(small_weights), "hash_type": "sha256"}]}


def test_download_with_url_then_inference_matches(source, small_weights, small_demo, http_dir, tmp_path):
    served, base_url = http_dir
    out = build_package(source, served, weights=small_weights)
    bundles = tmp_path / "bundles"
    _run_bundle("download", "--name", BUNDLE_NAME, "--version", VERSION, "--url", f"{base_url}/{out.name}",
                "--bundle_dir", str(bundles), "--progress", "False", cwd=tmp_path)
    downloaded = bundles / BUNDLE_NAME
    assert (downloaded / "configs" / "metadata.json").is_file()
    assert file_hash(downloaded / "models" / "model.pt") == file_hash(small_weights)

    scans = str(small_demo)
    # inference as a user runs it, from the downloaded bundle's own folder
    _run_bundle("run", "--config_file", "configs/inference.yaml", "--input", scans, "--spatial_size", SMALL,
                "--num_workers", "0", cwd=downloaded)
    got = _probabilities(downloaded / "eval" / "inference" / "qc.tsv")

    # reference: the repository's configs with the same weights
    ref_root = tmp_path / "reference"
    (ref_root / "models").mkdir(parents=True)
    (ref_root / "models" / "model.pt").write_bytes(small_weights.read_bytes())
    wf = ConfigWorkflow(config_file=str(BUNDLE_ROOT / "configs" / "inference.yaml"),
                        meta_file=str(BUNDLE_ROOT / "configs" / "metadata.json"), workflow_type="infer",
                        bundle_root=str(ref_root), input=scans, spatial_size=list(SMALL_SHAPE), num_workers=0)
    wf.initialize()
    wf.run()
    wf.finalize()
    expected = _probabilities(ref_root / "eval" / "inference" / "qc.tsv")
    assert got.keys() == expected.keys() and len(got) == 8
    for key, value in expected.items():
        assert got[key] == pytest.approx(value, abs=1e-6)
    assert len(set(round(v, 6) for v in got.values())) == len(got)  # distinct scans, distinct answers


def test_release_loads_the_way_monai_deploy_classification_operator_does(source, small_weights, small_demo, tmp_path):
    """Issue 16: MONAI Deploy's MonaiClassificationOperator (App SDK) reads <bundle>/configs/inference.json with
    only torch and monai as globals, applies `preprocessing#transforms` without LoadImaged to {"image": tensor},
    builds `network_def`, loads models/model.pt (weights_only) and applies `postprocessing#transforms` to
    {"pred": logits}. monai-deploy-app-sdk itself needs Holoscan (not installable beside our pins), so its
    loading contract is reproduced here on the release zip, against the QC pipeline's probabilities."""
    import zipfile

    import monai
    import torch
    from monai.bundle import ConfigParser
    from monai.transforms import Compose, LoadImaged

    from scripts.networks import Conv5FC3

    out = build_package(source, tmp_path / "dist", weights=small_weights)
    with zipfile.ZipFile(out) as zf:
        zf.extractall(tmp_path / "release")
    bundle = tmp_path / "release" / BUNDLE_NAME
    assert json.loads((bundle / "configs" / "inference.json").read_text()) == ConfigParser.load_config_file(
        str(BUNDLE_ROOT / "configs" / "inference.yaml"))  # the JSON is the YAML, generated at release time
    parser = ConfigParser()
    parser.read_config(str(bundle / "configs" / "inference.json"))
    parser.globals = {"torch": torch, "monai": monai}
    parser["spatial_size"] = list(SMALL_SHAPE)  # the demo size of the tests
    pre = Compose([t for t in parser.get_parsed_content("preprocessing#transforms") if type(t).__name__ != "LoadImaged"])
    model = parser.get_parsed_content("network_def")
    assert isinstance(model, Conv5FC3)
    model.load_state_dict(torch.load(str(bundle / "models" / "model.pt"), map_location="cpu", weights_only=True))
    model.eval()
    post = Compose(parser.get_parsed_content("postprocessing#transforms"))
    scan = sorted(small_demo.rglob("*.nii.gz"))[0]
    image = LoadImaged(keys="image", ensure_channel_first=True, image_only=True)({"image": str(scan)})["image"]
    x = pre({"image": torch.as_tensor(image).float()})["image"]  # the operator hands over plain tensors
    with torch.no_grad():
        prob = post({"pred": model(torch.as_tensor(x)[None])})["pred"][0]  # a batch of one (it batches 2D only)
    reference = parser.get_parsed_content("preprocessing")({"image": str(scan)})["image"]
    with torch.no_grad():
        expected = torch.softmax(model(torch.as_tensor(reference)[None]), dim=1)[0]
    assert prob.shape == (2,) and float(prob.sum()) == pytest.approx(1.0, abs=1e-5)
    assert torch.allclose(torch.as_tensor(prob), expected, atol=1e-5)


def test_download_from_github_release_and_large_files(source, small_weights, http_dir, tmp_path, monkeypatch):
    """`--source github` asks for <name>_v<version>.zip of a release; the release host is redirected to 127.0.0.1."""
    import monai.bundle.scripts as bundle_scripts

    served, base_url = http_dir
    (served / "weights").mkdir()
    (served / "weights" / "model.pt").write_bytes(small_weights.read_bytes())
    build_package(source, served, weights=small_weights, exclude_weights=True,
                  weights_url=f"{base_url}/weights/model.pt")
    requested = []

    def local_release_url(repo_owner, repo_name, tag_name, filename):
        requested.append((repo_owner, repo_name, tag_name, filename))
        return f"{base_url}/{filename}"

    monkeypatch.setattr(bundle_scripts, "_get_git_release_url", local_release_url)
    bundles = tmp_path / "bundles"
    bundle_scripts.download(name=BUNDLE_NAME, version=VERSION, source="github", repo="owner/repo/v" + VERSION,
                            bundle_dir=str(bundles), progress=False)
    assert requested == [("owner", "repo", "v" + VERSION, f"{BUNDLE_NAME}_v{VERSION}.zip")]
    downloaded = bundles / BUNDLE_NAME
    assert not (downloaded / "models" / "model.pt").exists()

    # weights left out: MONAI's download_large_files fetches them and checks the sha256
    _run_bundle("download_large_files", "--bundle_path", str(downloaded), cwd=tmp_path)
    weights = downloaded / "models" / "model.pt"
    assert verify_file(weights, downloaded) is True
    data = bytearray(weights.read_bytes())
    data[-100] ^= 0xFF  # tamper with one byte
    weights.write_bytes(bytes(data))
    with pytest.raises(WeightIntegrityError, match="failed its integrity check"):
        verify_file(weights, downloaded)


def test_other_weights_than_the_published_ones_are_refused(small_weights, tmp_path):
    """A bundle whose large_files.yml publishes a hash (the shipped weights) refuses to package other weights."""
    if not (BUNDLE_ROOT / "large_files.yml").is_file():
        pytest.skip("no published weights")
    with pytest.raises(WeightIntegrityError, match="does not match"):
        build_package(BUNDLE_ROOT, tmp_path, weights=small_weights)
    out = build_package(BUNDLE_ROOT, tmp_path)  # the shipped weights themselves
    with zipfile.ZipFile(out) as zf:
        assert zf.read(f"{BUNDLE_NAME}/models/model.pt") == (BUNDLE_ROOT / "models" / "model.pt").read_bytes()
        assert f"{BUNDLE_NAME}/models/threshold.json" in zf.namelist()
