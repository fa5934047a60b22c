"""Tests of the MONAI Label app in apps/motion_classification: classification JSON for a demo scan.

The app is exercised in-process (MONAILabelApp.infer, what the REST endpoint calls) and through a real
``monailabel start_server`` on 127.0.0.1. Both need monailabel (installed with ``--no-deps`` from
requirements-monailabel.txt); the server test also needs uvicorn. Without them the tests are skipped.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
import zipfile
from pathlib import Path

import pytest
import torch
from monai.bundle import ConfigParser

from conftest import BUNDLE_ROOT, SMALL_SHAPE
from ecosystem_helpers import save_small_model, unpublished_bundle
from scripts.package import BUNDLE_NAME, build_package

pytest.importorskip("monailabel", reason="monailabel is installed from requirements-monailabel.txt (--no-deps)")

APP_DIR = BUNDLE_ROOT / "apps" / "motion_classification"
SPATIAL = ",".join(map(str, SMALL_SHAPE))


@pytest.fixture(scope="module", autouse=True)
def keep_bundle_modules():
    """MONAI Label unloads and re-imports the bundle's ``scripts`` package; restore ours afterwards."""
    saved = {name: mod for name, mod in sys.modules.items() if name == "scripts" or name.startswith("scripts.")}
    path = list(sys.path)
    yield
    for name in [n for n in sys.modules if n == "scripts" or n.startswith("scripts.")]:
        del sys.modules[name]
    sys.modules.update(saved)
    sys.path[:] = path


@pytest.fixture(scope="module")
def served(small_demo, tmp_path_factory) -> dict:
    """A released bundle (small random weights) and a studies folder holding three demo scans."""
    work = tmp_path_factory.mktemp("monailabel")
    save_small_model(work / "model.pt", seed=3)
    with zipfile.ZipFile(build_package(unpublished_bundle(work / "source"), work, weights=work / "model.pt")) as zf:
        zf.extractall(work / "bundles")
    studies = work / "studies"
    studies.mkdir()
    scans = sorted(small_demo.rglob("*.nii.gz"))[:3]
    for scan in scans:
        shutil.copy(scan, studies / scan.name)
    return {"bundle": work / "bundles" / BUNDLE_NAME, "studies": studies, "ids": [s.name[: -len(".nii.gz")] for s in scans]}


def _expected(bundle: Path, scan: Path) -> list[float]:
    """Class probabilities from the bundle's own preprocessing and network (the reference)."""
    parser = ConfigParser()
    parser.read_config(str(bundle / "configs" / "inference.yaml"))
    parser.update({"bundle_root": str(bundle), "spatial_size": list(SMALL_SHAPE)})
    net = parser.get_parsed_content("network_def")
    net.load_state_dict(torch.load(bundle / "models" / "model.pt", weights_only=True))
    image = parser.get_parsed_content("preprocessing")({"image": str(scan)})["image"]
    with torch.no_grad():
        return torch.softmax(net.eval()(image[None].as_tensor()), dim=1)[0].tolist()


def _check_result(result: dict, expected: list[float], version: str) -> None:
    assert [p["label"] for p in result["prediction"]] == ["no_motion", "motion"]
    assert [p["idx"] for p in result["prediction"]] == [0, 1]
    scores = [p["score"] for p in result["prediction"]]
    assert scores == pytest.approx(expected, abs=1e-5) and sum(scores) == pytest.approx(1.0, abs=1e-5)
    assert result["probabilities"] == {"no_motion": scores[0], "motion": scores[1]}
    assert result["motion_probability"] == scores[1]
    assert result["bundle_version"] == version


def _app(served: dict, **conf):
    if str(APP_DIR) not in sys.path:
        sys.path.insert(0, str(APP_DIR))
    spec = importlib.util.spec_from_file_location("motion_app_main", APP_DIR / "main.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    conf = {"bundle_path": str(served["bundle"]), "spatial_size": SPATIAL, **conf}
    return module.MotionClassificationApp(str(APP_DIR), str(served["studies"]), conf)


def test_in_process_request_returns_class_probabilities(served):
    app = _app(served)
    info = app.info()
    model = info["models"][BUNDLE_NAME]
    assert model["type"] == "classification" and model["labels"] == {"no_motion": 0, "motion": 1}
    assert sorted(app.datastore().list_images()) == sorted(served["ids"])
    version = json.loads((served["bundle"] / "configs" / "metadata.json").read_text())["version"]
    motion = []
    for image_id in served["ids"]:
        result = app.infer({"model": BUNDLE_NAME, "image": image_id, "device": "cpu"})
        assert result["file"] is None  # classification: no label file, JSON only
        scan = served["studies"] / f"{image_id}.nii.gz"
        _check_result(result["params"], _expected(served["bundle"], scan), version)
        motion.append(result["params"]["motion_probability"])
    assert len(set(motion)) == len(motion)  # each scan gets its own answer


def test_tampered_weights_are_refused_by_the_app(served, tmp_path):
    from scripts.integrity import WeightIntegrityError

    bundle = tmp_path / BUNDLE_NAME
    shutil.copytree(served["bundle"], bundle)
    (bundle / "large_files.yml").write_text(
        "large_files:\n  - path: models/model.pt\n    url: https://example.org/model.pt\n"
        f"    hash_val: '{'0' * 64}'\n    hash_type: sha256\n"
    )
    app = _app({**served, "bundle": bundle})
    with pytest.raises(Exception) as err:  # MONAI Label may wrap the error
        app.infer({"model": BUNDLE_NAME, "image": served["ids"][0], "device": "cpu"})
    chain, exc = [], err.value
    while exc is not None:
        chain.append(exc)
        exc = exc.__cause__ or exc.__context__
    assert any(type(e).__name__ == WeightIntegrityError.__name__ for e in chain) or "integrity check" in str(err.value)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_rest_server_answers_with_json(served, tmp_path):
    pytest.importorskip("uvicorn")
    pytest.importorskip("fastapi")
    app_dir = tmp_path / "app"  # a copy, so the server's logs/ and model/ folders stay out of the repository
    shutil.copytree(APP_DIR, app_dir, ignore=shutil.ignore_patterns("__pycache__", "logs", "model", "bin"))
    port = _free_port()
    cmd = [sys.executable, "-m", "monailabel.main", "start_server", "--app", str(app_dir),
           "--studies", str(served["studies"]), "--host", "127.0.0.1", "--port", str(port),
           "--conf", "bundle_path", str(served["bundle"]), "--conf", "spatial_size", SPATIAL]
    log = (tmp_path / "server.log").open("w")
    server = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=tmp_path)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(f"{base}/info/", timeout=5) as r:
                    info = json.load(r)
                break
            except OSError:
                assert server.poll() is None, (tmp_path / "server.log").read_text()[-4000:]
                assert time.monotonic() < deadline, "server did not start within 120 s"
                time.sleep(1)
        assert info["models"][BUNDLE_NAME]["type"] == "classification"
        image_id = served["ids"][0]
        request = urllib.request.Request(f"{base}/infer/{BUNDLE_NAME}?image={image_id}&output=json", method="POST")
        with urllib.request.urlopen(request, timeout=120) as r:
            result = json.load(r)
        version = json.loads((served["bundle"] / "configs" / "metadata.json").read_text())["version"]
        _check_result(result, _expected(served["bundle"], served["studies"] / f"{image_id}.nii.gz"), version)
    finally:
        server.terminate()
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait(timeout=10)
        log.close()
