"""PACS in, PACS out (scripts/pacs.py, configs/pacs.yaml) against a real Orthanc with its DICOMweb plugin on
127.0.0.1: query -> retrieve -> score -> structured report stored and read back, one row per series, broken
series with their statuses, and a resumed job that downloads nothing it recorded.

Orthanc comes from Debian (``apt-get install orthanc orthanc-dicomweb``; `.ci/run` installs it when it can);
without it the server tests are skipped with a message. The series-selection rules are tested without it.
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest
from monai.bundle import ConfigWorkflow

from conftest import BUNDLE_ROOT, SMALL_SHAPE, write_dicom_series
from ecosystem_helpers import save_small_model

CONFIGS = BUNDLE_ROOT / "configs"
PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")
MR = "1.2.840.10008.5.1.4.1.1.4"


def _header(**values):
    """A DICOM JSON header with the attributes classify_series reads."""
    from scripts.pacs import _TAGS

    vr = {"ImageType": "CS", "Modality": "CS", "SOPClassUID": "UI", "MRAcquisitionType": "CS", "EchoTime": "DS",
          "RepetitionTime": "DS"}
    out = {}
    for key, value in {"Modality": "MR", "SOPClassUID": MR, **values}.items():
        if value is not None:
            out[_TAGS[key]] = {"vr": vr.get(key, "LO"), "Value": value if isinstance(value, list) else [value]}
    return out


@pytest.mark.parametrize(
    "values, selected, why",
    [
        ({"SeriesDescription": "T1 MPRAGE sag", "MRAcquisitionType": "3D"}, True, ""),
        ({"ProtocolName": "3D_SPGR", "MRAcquisitionType": "3D"}, True, ""),
        ({"SeriesDescription": "ax 3d", "EchoTime": 3.1, "RepetitionTime": 2300}, True, ""),  # by its timing
        ({"SeriesDescription": "ax 3d", "EchoTime": 90, "RepetitionTime": 5000}, False, "not recognisably"),
        ({"SeriesDescription": "T1 MPRAGE", "MRAcquisitionType": "2D"}, False, "not 3D"),
        ({"SeriesDescription": "3D FLAIR", "MRAcquisitionType": "3D"}, False, "another contrast"),
        ({"SeriesDescription": "T1 MPRAGE", "ImageType": ["ORIGINAL", "PRIMARY", "LOCALIZER"]}, False, "localizer"),
        ({"SeriesDescription": "T1 MPRAGE", "ImageType": ["DERIVED", "SECONDARY", "MPR"]}, False, "derived"),
        ({"Modality": "CT", "SeriesDescription": "T1"}, False, "modality CT"),
        ({"SOPClassUID": "1.2.840.10008.5.1.4.1.1.4.2", "SeriesDescription": "T1"}, False, "SOP class"),
        ({"SOPClassUID": "1.2.840.10008.5.1.4.1.1.4.1", "SeriesDescription": "T1"}, False, "Enhanced MR"),
    ],
)
def test_series_selection_rules(values, selected, why):
    from scripts.pacs import classify_series

    ok, reason = classify_series(_header(**values))
    assert ok is selected and why in reason


def test_series_uris_and_sources_travel_to_workers():
    import pickle

    pytest.importorskip("dicomweb_client", reason="the PACS packages are optional: pip install -r requirements-pacs.txt")
    from scripts.pacs import DicomWebSource, parse_series_uri

    source = DicomWebSource("http://127.0.0.1:1/dicom-web/", auth="basic")
    uri = source.uri("1.2.3", "1.2.3.4")
    assert parse_series_uri(uri) == ("http://127.0.0.1:1/dicom-web", "1.2.3", "1.2.3.4") and source.handles(uri)
    assert not source.handles("dicomweb:http://elsewhere/dicom-web/studies/1/series/2")
    with pytest.raises(ValueError, match="DICOMWEB_USER"):  # secrets come from the environment, never the config
        source.client()
    copy = pickle.loads(pickle.dumps(source))
    assert copy.url == source.url and copy._client is None
    with pytest.raises(ValueError, match="auth"):
        DicomWebSource("http://x", auth="kerberos")


# ---------------------------------------------------------------------------------------------
# a real server
# ---------------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory):
    """An empty Orthanc with DICOMweb on 127.0.0.1; yields its DICOMweb root."""
    pytest.importorskip("dicomweb_client", reason="the PACS packages are optional: pip install -r requirements-pacs.txt")
    pytest.importorskip("highdicom", reason="the PACS packages are optional: pip install -r requirements-pacs.txt")
    binary = shutil.which("Orthanc") or next((b for b in ("/usr/sbin/Orthanc",) if Path(b).is_file()), None)
    if binary is None or not PLUGIN.is_file():
        pytest.skip("Orthanc with its DICOMweb plugin is not installed (apt-get install orthanc orthanc-dicomweb)")
    import requests

    root = tmp_path_factory.mktemp("orthanc")
    port = _free_port()
    config = {
        "Name": "qc-test", "StorageDirectory": str(root / "db"), "IndexDirectory": str(root / "db"),
        "HttpPort": port, "HttpBindAddress": "127.0.0.1", "RemoteAccessAllowed": False, "AuthenticationEnabled": False,
        "DicomServerEnabled": False, "Plugins": [str(PLUGIN)], "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
    }  # fmt: skip
    (root / "config.json").write_text(json.dumps(config))
    log = open(root / "orthanc.log", "w")
    proc = subprocess.Popen([binary, str(root / "config.json")], stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    for _ in range(100):
        try:
            if requests.get(f"{url}/system", timeout=1).ok:
                break
        except requests.ConnectionError:
            time.sleep(0.2)
    else:
        proc.kill()
        pytest.fail(f"Orthanc did not start: {(root / 'orthanc.log').read_text()[-2000:]}")
    yield f"{url}/dicom-web"
    proc.terminate()
    proc.wait(timeout=30)
    log.close()


def _upload(url: str, folder: Path) -> None:
    import requests

    server = url.rsplit("/dicom-web", 1)[0]
    for f in sorted(folder.iterdir()):
        requests.post(f"{server}/instances", data=f.read_bytes(), timeout=30).raise_for_status()


@pytest.fixture(scope="module")
def pacs(orthanc, small_demo, tmp_path_factory):
    """Orthanc loaded with six series of two patients: two 3D T1w (scored), a T1w with a missing slice, a
    CT, an MR object of a non-image SOP class, and a FLAIR."""
    import SimpleITK as sitk  # noqa: N813

    root = tmp_path_factory.mktemp("pacs_data")
    scans = sorted(small_demo.rglob("*.nii.gz"))
    uid = "1.2.826.0.1.3680043.2.1125.77"
    t1 = {"0008|103e": "T1 MPRAGE", "0018|0023": "3D"}
    series = {  # name: (image, patient, study, tags, skipped slices, expected status)
        "t1_a": (scans[0], "PAT1", 1, t1, (), ("ok", "warning")),
        "t1_b": (scans[1], "PAT2", 2, t1, (), ("ok", "warning")),
        "t1_gap": (scans[2], "PAT2", 2, t1, (20,), ("dicom_missing_slice",)),
        "ct": (scans[0], "PAT1", 1, {"0008|0060": "CT", "0008|0016": "1.2.840.10008.5.1.4.1.1.2"}, (), ("not_t1w",)),
        "spectro": (scans[0], "PAT1", 1, {**t1, "0008|0016": "1.2.840.10008.5.1.4.1.1.4.2"}, (), ("not_t1w",)),
        "flair": (scans[1], "PAT2", 2, {"0008|103e": "3D FLAIR", "0018|0023": "3D"}, (), ("not_t1w",)),
    }
    expected = {}
    for k, (scan, patient, study, tags, skip, status) in enumerate(series.values(), start=1):
        image = sitk.Cast(sitk.RescaleIntensity(sitk.ReadImage(str(scan)), 0, 2000), sitk.sitkInt16)
        tags = {"0010|0020": patient, "0010|0010": patient, "0008|0020": f"2024010{study}", **tags}
        folder = root / f"s{k}"
        write_dicom_series(image, folder, series_uid=f"{uid}.{k}", study_uid=f"{uid}.0.{study}", tags=tags, skip=skip)
        _upload(orthanc, folder)
        expected[f"{uid}.{k}"] = status
    bundle = root / "bundle"
    save_small_model(bundle / "models" / "model.pt", seed=4)
    return {"url": orthanc, "expected": expected, "bundle": bundle}


def _run(pacs, out: Path, **override) -> ConfigWorkflow:
    wf = ConfigWorkflow(
        config_file=[str(CONFIGS / "inference.yaml"), str(CONFIGS / "pacs.yaml")],
        meta_file=str(CONFIGS / "metadata.json"), logging_file=str(CONFIGS / "logging.conf"), workflow_type="infer",
        bundle_root=str(pacs["bundle"]), spatial_size=list(SMALL_SHAPE), progress=False, output_dir=str(out),
        dicomweb_url=pacs["url"], modality=None, num_workers=1, store_sr=True, **override,
    )  # fmt: skip
    wf.initialize()
    wf.run()
    return wf


def _starts(out: Path) -> list[str]:
    return [json.loads(line)["path"] for f in sorted((out / ".qc").glob("attempts-rank*.jsonl"))
            for line in f.read_text().splitlines() if '"started"' in line]  # fmt: skip


def test_query_retrieve_score_and_store_reports(pacs, tmp_path):
    """Issue 16: one row per series, broken series with their statuses, SRs on disk and stored back."""
    from dicomweb_client.api import DICOMwebClient

    from scripts.pacs import parse_series_uri
    from scripts.qc import read_qc_table

    out = tmp_path / "out"
    _run(pacs, out)
    rows = {parse_series_uri(r["path"])[2]: r for r in read_qc_table(out / "qc.tsv")}
    assert set(rows) == set(pacs["expected"])
    for series_uid, statuses in pacs["expected"].items():
        assert rows[series_uid]["status"] in statuses, rows[series_uid]
    assert "modality CT" in rows[f"{list(pacs['expected'])[3]}"]["reason"]
    assert {rows[s]["participant_id"] for s in rows} == {"sub-PAT1", "sub-PAT2"}
    assert set(_starts(out)) == {r["path"] for r in rows.values() if r["status"] not in ("not_t1w",)}  # only those fetched
    scored = {s: r for s, r in rows.items() if r["prob_motion"]}
    assert len(scored) == 2 and sorted(p.stem for p in (out / "sr").glob("*[0-9].dcm")) == sorted(scored)
    cards = sorted(p.stem for p in (out / "sr").glob("*_card.dcm"))
    assert cards == sorted(f"{s}_card" for s in scored)  # the report card's picture beside each SR
    client = DICOMwebClient(pacs["url"])
    found = client.search_for_series(search_filters={"Modality": "SR"})
    assert len(found) == 2
    pictures = client.search_for_series(search_filters={"Modality": "OT"})  # secondary capture
    assert len(pictures) == 2
    for series in found:
        study_uid, sr_series = series["0020000D"]["Value"][0], series["0020000E"]["Value"][0]
        report = client.retrieve_series(study_uid, sr_series)[0]
        evidence = report.get("CurrentRequestedProcedureEvidenceSequence") or report.PertinentOtherEvidenceSequence
        referenced = evidence[0].ReferencedSeriesSequence[0].SeriesInstanceUID
        assert report.StudyInstanceUID == study_uid == evidence[0].StudyInstanceUID  # filed in the source's study
        row = scored[referenced]
        items = {i.ConceptNameCodeSequence[0].CodeMeaning: i for i in report.ContentSequence}
        prob = float(items["Motion artefact probability"].MeasuredValueSequence[0].NumericValue)
        assert prob == pytest.approx(float(row["prob_motion"]), abs=1e-5)
        assert items["Model sha256"].TextValue == row["model_sha256"] and report.PatientID == row["participant_id"][4:]
        assert items["Motion artefact decision"].ConceptCodeSequence[0].CodeMeaning in ("Motion artefact present", "No motion")


def test_a_resumed_job_downloads_nothing_it_recorded(pacs, tmp_path):
    """Issue 16: a killed job resumes without downloading again what it recorded, and stores no SR twice."""
    from dicomweb_client.api import DICOMwebClient

    out = tmp_path / "out"
    _run(pacs, out)
    fetched = _starts(out)
    journal = out / ".qc" / "journal-rank0.jsonl"
    lines = journal.read_text().splitlines(keepends=True)
    lost = next(json.loads(line)["path"] for line in lines if json.loads(line)["prob_motion"])
    journal.write_text("".join(line for line in lines if json.loads(line)["path"] != lost))  # killed before recording it
    (out / "qc.tsv").unlink()
    stored_before = len(DICOMwebClient(pacs["url"]).search_for_series(search_filters={"Modality": "SR"}))
    _run(pacs, out)
    assert _starts(out)[len(fetched):] == [lost]  # only the unrecorded series was downloaded again
    assert len(DICOMwebClient(pacs["url"]).search_for_series(search_filters={"Modality": "SR"})) == stored_before
    assert len((out / ".qc" / "stored.jsonl").read_text().splitlines()) == 2
