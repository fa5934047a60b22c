"""PACS in, PACS out: the QC job fed from a DICOMweb server, its results written back as DICOM Structured
Reports.

In (``configs/pacs.yaml``, an overlay on ``configs/inference.yaml``):

1. :func:`series_items` searches the server (QIDO-RS) for the series of the studies asked for (a list of
   study UIDs, or filters such as a study-date range and a modality), reads the header of one instance of
   each series (WADO-RS metadata) and decides from its DICOM attributes whether it is a 3D T1-weighted MR
   image series (:func:`classify_series`; docs/pacs.md). Every series found becomes one QC input, keyed by
   its URI ``dicomweb:<server>/studies/<study>/series/<series>``; a series that is not a 3D T1w gets the
   status ``not_t1w`` and its reason without being downloaded.
2. The QC job's loader (:class:`scripts.qc.ScanLoader` with ``fetch=`` a :class:`DicomWebSource`) downloads
   a selected series in its worker process (WADO-RS, instance by instance into a temporary folder), reads
   it with the DICOM checks of every DICOM folder (missing slices, spacing), scores it, and deletes the
   folder: at most ``num_workers`` series are on disk at once, nothing is mirrored. The QC journal makes a
   re-run skip (and not download again) every series it recorded.

Out: :func:`write_reports` makes one DICOM Comprehensive 3D SR per scored series (highdicom): motion
probability, decision, threshold, model sha256, bundle version, referencing the source series. It is
always written to ``<output_dir>/sr/<SeriesInstanceUID>.dcm`` and stored back (STOW-RS) when asked; what
was stored is journaled, so a re-run stores nothing twice.

Authentication: none, HTTP basic (user and password from environment variables) or a bearer token from
an environment variable; secrets are never written to configs or outputs.
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from scripts.common.inputs import entity_label

__all__ = ["DicomWebSource", "SCHEME", "classify_series", "parse_series_uri", "series_items", "write_reports"]

logger = logging.getLogger(__name__)

#: Prefix of the QC input key of a series on a DICOMweb server.
SCHEME = "dicomweb:"
_MR_IMAGE = "1.2.840.10008.5.1.4.1.1.4"
_ENHANCED_MR = "1.2.840.10008.5.1.4.1.1.4.1"
_T1_NAMES = re.compile(r"t1|mprage|mp-rage|mp2rage|spgr|bravo|tfl|tfe|flash|vibe|3d.?ir", re.IGNORECASE)
_OTHER_NAMES = re.compile(
    r"t2|flair|dwi|dti|diffusion|swi|susc|pd\b|proton|bold|fmri|perf|asl|tof|angio|localizer|scout|survey|"
    r"map\b|adc|fa\b",
    re.IGNORECASE,
)  # fmt: skip
_TAGS = {
    "StudyInstanceUID": "0020000D",
    "SeriesInstanceUID": "0020000E",
    "SOPInstanceUID": "00080018",
    "SOPClassUID": "00080016",
    "Modality": "00080060",
    "SeriesDescription": "0008103E",
    "ProtocolName": "00181030",
    "ImageType": "00080008",
    "MRAcquisitionType": "00180023",
    "RepetitionTime": "00180080",
    "EchoTime": "00180081",
    "PatientID": "00100020",
    "StudyDate": "00080020",
    "NumberOfSeriesRelatedInstances": "00201209",
}


def _value(dataset: Mapping[str, Any], keyword: str) -> Any:
    """A DICOM JSON attribute's value (the first one, or the list for multi-valued ImageType); None if absent."""
    element = dataset.get(_TAGS[keyword]) or {}
    values = element.get("Value") or []
    if not values:
        return None
    return values if keyword == "ImageType" else values[0]


class DicomWebSource:
    """Where the scans are: a DICOMweb server and how to reach it. Picklable (the QC job's workers each make
    their own HTTP session from it).

    Args:
        url: the server's DICOMweb root, e.g. ``https://pacs.example.org/dicom-web``.
        auth: ``None``, ``"basic"`` (user and password in the environment variables named by
            ``user_env``/``password_env``) or ``"bearer"`` (a token in the variable named by ``token_env``).
        timeout: seconds of each HTTP request (connect and read).
        retries: attempts of a failed request (connection errors and 429/5xx answers), with back-off.
        max_instances: a series holding more instances is not downloaded (status ``unsupported_format``): a
            guard against fetching, say, a 4,000-image functional run.
        ca_bundle: a CA certificate file for a server with its own certificate authority.
    """

    def __init__(
        self,
        url: str,
        auth: str | None = None,
        user_env: str = "DICOMWEB_USER",
        password_env: str = "DICOMWEB_PASSWORD",
        token_env: str = "DICOMWEB_TOKEN",
        timeout: float = 60.0,
        retries: int = 3,
        max_instances: int = 2000,
        ca_bundle: str | None = None,
    ) -> None:
        if auth not in (None, "none", "basic", "bearer"):
            raise ValueError(f"dicomweb auth must be null, 'basic' or 'bearer', got {auth!r}.")
        self.url = str(url).rstrip("/")
        self.auth = None if auth == "none" else auth
        self.user_env, self.password_env, self.token_env = user_env, password_env, token_env
        self.timeout, self.retries = float(timeout), max(1, int(retries))
        self.max_instances = int(max_instances)
        self.ca_bundle = ca_bundle
        self._client: Any = None

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_client": None}  # sessions do not travel to worker processes

    def client(self) -> Any:
        """A :class:`dicomweb_client.api.DICOMwebClient` for this server (one per process)."""
        if self._client is None:
            import requests
            from dicomweb_client.api import DICOMwebClient
            from requests.adapters import HTTPAdapter
            from urllib3.util.retry import Retry

            session = requests.Session()
            retry = Retry(total=self.retries - 1, backoff_factor=1.0, status_forcelist=(429, 500, 502, 503, 504))
            session.mount("http://", HTTPAdapter(max_retries=retry))
            session.mount("https://", HTTPAdapter(max_retries=retry))
            if self.auth == "basic":
                session.auth = (self._secret(self.user_env), self._secret(self.password_env))
            elif self.auth == "bearer":
                session.headers["Authorization"] = f"Bearer {self._secret(self.token_env)}"
            if self.ca_bundle:
                session.verify = self.ca_bundle
            session.request = _with_timeout(session.request, self.timeout)  # type: ignore[method-assign]
            self._client = DICOMwebClient(self.url, session=session)
        return self._client

    @staticmethod
    def _secret(name: str) -> str:
        value = os.environ.get(name)
        if not value:
            raise ValueError(f"DICOMweb authentication needs the environment variable {name}.")
        return value

    def handles(self, path: str) -> bool:
        """Whether ``path`` is a series of this server (the QC loader asks before downloading)."""
        return str(path).startswith(f"{SCHEME}{self.url}/")

    def uri(self, study_uid: str, series_uid: str) -> str:
        """The QC input key of a series."""
        return f"{SCHEME}{self.url}/studies/{study_uid}/series/{series_uid}"

    def download(self, uri: str, folder: str | os.PathLike) -> int:
        """Retrieve the instances of the series ``uri`` into ``folder`` one at a time (WADO-RS); returns
        their number. Raises ``ValueError`` for a URI of another server, ``OSError``/HTTP errors otherwise."""
        url, study_uid, series_uid = parse_series_uri(uri)
        if url != self.url:
            raise ValueError(f"{uri} is not on {self.url}")
        folder = Path(folder)
        count = 0
        for dataset in self.client().iter_series(study_uid, series_uid):
            count += 1
            if count > self.max_instances:
                raise OverflowError(f"the series holds more than {self.max_instances} instances")
            dataset.save_as(str(folder / f"{count:05d}.dcm"), write_like_original=False)
        return count


def _with_timeout(request: Any, timeout: float) -> Any:
    def call(method: str, url: str, **kwargs: Any) -> Any:
        kwargs.setdefault("timeout", timeout)
        return request(method, url, **kwargs)

    return call


def parse_series_uri(uri: str) -> tuple[str, str, str]:
    """``(server url, StudyInstanceUID, SeriesInstanceUID)`` of a ``dicomweb:`` input key."""
    match = re.fullmatch(rf"{SCHEME}(.+)/studies/([0-9.]+)/series/([0-9.]+)", str(uri))
    if match is None:
        raise ValueError(f"not a DICOMweb series URI: {uri!r}")
    return match.group(1), match.group(2), match.group(3)


def classify_series(header: Mapping[str, Any]) -> tuple[bool, str]:
    """Whether a series is a 3D T1-weighted MR image series, from the DICOM JSON header of one of its
    instances; ``(True, "")`` or ``(False, why not)``. The rules (docs/pacs.md):

    1. Modality ``MR`` and SOP class MR Image Storage (Enhanced MR multi-frame objects are not read yet);
    2. ImageType not ``LOCALIZER`` nor a derived map (``DERIVED`` with ``MPR``/``PROJECTION``/``MAP``);
    3. MRAcquisitionType ``3D`` when the attribute is present (a 2D stack is refused: thick slices);
    4. T1 weighting: a series description or protocol naming another contrast (T2, FLAIR, DWI, ...) is
       refused; one naming a T1 sequence (T1, MPRAGE, SPGR, BRAVO, TFE, FLASH, ...) is accepted; otherwise
       the timing decides: echo time at most 10 ms and repetition time at most 3,000 ms.
    """
    modality = _value(header, "Modality")
    if modality != "MR":
        return False, f"modality {modality or 'missing'}, not MR"
    sop_class = _value(header, "SOPClassUID")
    if sop_class == _ENHANCED_MR:
        return False, "Enhanced MR (multi-frame) objects are not read yet"
    if sop_class != _MR_IMAGE:
        return False, f"SOP class {sop_class or 'missing'} is not MR Image Storage"
    image_type = [str(v).upper() for v in (_value(header, "ImageType") or [])]
    if "LOCALIZER" in image_type:
        return False, "a localizer"
    if "DERIVED" in image_type and {"MPR", "PROJECTION IMAGE", "MAP", "MIP"} & set(image_type):
        return False, f"a derived image ({'/'.join(image_type)})"
    acquisition = _value(header, "MRAcquisitionType")
    if acquisition is not None and str(acquisition).upper() != "3D":
        return False, f"MRAcquisitionType {acquisition}, not 3D"
    names = " ".join(str(_value(header, k) or "") for k in ("SeriesDescription", "ProtocolName"))
    if _OTHER_NAMES.search(names):
        return False, f"described as another contrast ({names.strip()!r})"
    if _T1_NAMES.search(names):
        return True, ""
    echo, repetition = _value(header, "EchoTime"), _value(header, "RepetitionTime")
    if echo is not None and repetition is not None and float(echo) <= 10 and float(repetition) <= 3000:
        return True, ""
    return False, f"not recognisably T1-weighted (description {names.strip()!r}, TE {echo}, TR {repetition})"


def _first_header(client: Any, study_uid: str, series_uid: str) -> dict[str, Any]:
    """The DICOM JSON header (WADO-RS metadata) of the first instance of a series."""
    first = client.search_for_instances(study_uid, series_uid, limit=1)
    return client.retrieve_instance_metadata(study_uid, series_uid, _value(first[0], "SOPInstanceUID"))


def _entity(prefix: str, text: Any) -> str:
    """A BIDS entity (``sub-PAT1``) of a DICOM value, or "" when it has no letter or digit."""
    cleaned = entity_label(str(text or ""))
    return f"{prefix}-{cleaned}" if cleaned else ""


def series_items(
    source: DicomWebSource,
    study_uids: Sequence[str] | str | None = None,
    study_date: str | None = None,
    modality: str | None = "MR",
    extra_filters: Mapping[str, Any] | None = None,
    limit: int | None = None,
) -> list[dict[str, Any]]:
    """QC inputs for the series of a DICOMweb server: ``{"image": uri, "participant_id", "session_id",
    "series_description"}`` for every series found, plus ``qc_status``/``qc_reason`` for those that are not
    3D T1w (the loader records them without downloading).

    Args:
        source: the server. study_uids: only these studies (one QIDO search each). study_date: a DICOM
            date or range (``20240101-20240131``). modality: the series' modality filter (None: all).
        extra_filters: more QIDO-RS search filters (``{"SeriesDescription": "*T1*"}``).
        limit: at most this many series (the first ones the server returns).
    """
    client = source.client()
    filters: dict[str, Any] = dict(extra_filters or {})
    if modality:
        filters["Modality"] = modality
    if study_date:
        filters["StudyDate"] = study_date
    studies = [study_uids] if isinstance(study_uids, str) else list(study_uids or [None])
    found: list[dict[str, Any]] = []
    for study in studies:
        found += client.search_for_series(study_instance_uid=study, search_filters=filters, get_remaining=True)
    items = []
    for series in found[:limit] if limit else found:
        study_uid, series_uid = _value(series, "StudyInstanceUID"), _value(series, "SeriesInstanceUID")
        item: dict[str, Any] = {
            "image": source.uri(study_uid, series_uid),
            "series_description": str(_value(series, "SeriesDescription") or ""),
        }
        try:
            header = _first_header(client, study_uid, series_uid)
        except Exception as err:  # noqa: BLE001 - one series must not stop the search
            item.update(qc_status="unreadable", qc_reason=f"no instance header ({type(err).__name__}: {err})"[:300])
            items.append(item)
            continue
        item["participant_id"] = _entity("sub", _value(header, "PatientID"))
        item["session_id"] = _entity("ses", _value(header, "StudyDate"))
        selected, why = classify_series(header)
        if not selected:
            item.update(qc_status="not_t1w", qc_reason=why)
        items.append(item)
    logger.info(
        "DICOMweb %s: %d series, %d selected as 3D T1w.",
        source.url,
        len(items),
        sum("qc_status" not in i for i in items),
    )
    return items


# ---------------------------------------------------------------------------------------------
# PACS out: structured reports
# ---------------------------------------------------------------------------------------------
_SCHEME_DESIGNATOR = "99BRAINMOTIONQC"


def _code(value: str, meaning: str) -> Any:
    from highdicom.sr import CodedConcept

    return CodedConcept(value=value, scheme_designator=_SCHEME_DESIGNATOR, meaning=meaning)


def make_report(row: Mapping[str, Any], evidence: Any, series_number: int = 9901) -> Any:
    """A Comprehensive 3D SR (highdicom) of one QC row, referencing ``evidence`` (a pydicom Dataset of one
    source instance: patient, study and series identity)."""
    import highdicom as hd
    from highdicom.sr import CodeContentItem, ContainerContentItem, NumContentItem, TextContentItem
    from pydicom.sr.codedict import codes

    unit = hd.sr.CodedConcept(value="1", scheme_designator="UCUM", meaning="no units")

    def number(code: str, meaning: str, value: Any) -> Any:
        return NumContentItem(name=_code(code, meaning), value=float(value), unit=unit, relationship_type="CONTAINS")

    def text(name: Any, value: Any) -> Any:
        return TextContentItem(name=name, value=str(value)[:1024], relationship_type="CONTAINS")

    present = row.get("decision") == "motion"
    root = ContainerContentItem(name=_code("MQC0", "Motion artefact quality control"))
    children = [
        number("MQC1", "Motion artefact probability", row["prob_motion"]),
        CodeContentItem(
            name=_code("MQC2", "Motion artefact decision"),
            value=_code("MQC3", "Motion artefact present") if present else _code("MQC4", "No motion"),
            relationship_type="CONTAINS",
        ),
        number("MQC5", "Decision threshold", row["threshold"]),
        text(_code("MQC6", "Model sha256"), row["model_sha256"]),
        text(_code("MQC7", "Bundle"), f"brain_t1w_motion_classification {row['bundle_version']}"),
    ]
    if row.get("reason"):
        children.append(text(codes.DCM.Comment, row["reason"]))
    root.ContentSequence = children
    return hd.sr.Comprehensive3DSR(
        evidence=[evidence],
        content=root,
        series_instance_uid=hd.UID(),
        series_number=series_number,
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer="brain_t1w_motion_classification (MONAI bundle)",
        is_complete=True,
        series_description="Motion artefact QC",
    )


def make_card(thumbnail: str | os.PathLike, evidence: Any, series_number: int = 9902) -> Any:
    """The QC report card's picture (a JPEG thumbnail) as an RGB secondary-capture image (highdicom) in the
    study of ``evidence``."""
    import highdicom as hd
    import numpy as np
    from PIL import Image

    with Image.open(thumbnail) as picture:
        pixels = np.asarray(picture.convert("RGB"), dtype=np.uint8)
    card = hd.sc.SCImage.from_ref_dataset(
        ref_dataset=evidence,
        pixel_array=pixels,
        photometric_interpretation="RGB",
        bits_allocated=8,
        coordinate_system="PATIENT",
        series_instance_uid=hd.UID(),
        series_number=series_number,
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer="brain_t1w_motion_classification (MONAI bundle)",
        patient_orientation=("L", "P"),
    )
    card.SeriesDescription = "Motion artefact QC card"
    return card


def write_reports(
    table: str | os.PathLike, source: DicomWebSource, output_dir: str | os.PathLike, store: bool = False
) -> dict[str, int]:
    """One SR per scored DICOMweb row of a ``qc.tsv``: written to ``<output_dir>/sr/<series>.dcm`` (atomic;
    an existing file is kept), with the report card's picture (the QC thumbnail: three central slices under
    the saliency map) as a secondary-capture image ``<series>_card.dcm`` when the thumbnail exists, and both
    stored back to the server (STOW-RS) when ``store``. Stored series are journaled in
    ``<output_dir>/.qc/stored.jsonl``. A failure is logged and counted, never fatal: the QC table stays the
    record. Returns ``{"written", "stored", "failed"}``."""
    import pydicom
    from pydicom.dataset import Dataset

    from scripts.common.files import atomic_write
    from scripts.qc.journal import read_jsonl, read_qc_table
    from scripts.qc.report import thumbnail_name

    out = Path(output_dir)
    (out / "sr").mkdir(parents=True, exist_ok=True)
    (out / ".qc").mkdir(parents=True, exist_ok=True)
    stored_log = out / ".qc" / "stored.jsonl"
    stored = {r["path"]: r for r in read_jsonl(stored_log)}
    counts = {"written": 0, "stored": 0, "failed": 0}
    client = source.client()
    for row in read_qc_table(table):
        if not row["path"].startswith(SCHEME) or row.get("prob_motion") in (None, ""):
            continue
        try:
            _, study_uid, series_uid = parse_series_uri(row["path"])
            path = out / "sr" / f"{series_uid}.dcm"
            card = out / "sr" / f"{series_uid}_card.dcm"
            thumbnail = out / "qc_thumbnails" / thumbnail_name(row["path"])
            if not path.is_file() or (thumbnail.is_file() and not card.is_file()):
                evidence = Dataset.from_json(_first_header(client, study_uid, series_uid))
                if not path.is_file():
                    report = make_report(row, evidence)
                    atomic_write(path, lambda tmp, ds=report: ds.save_as(str(tmp), write_like_original=False))
                    counts["written"] += 1
                if thumbnail.is_file() and not card.is_file():
                    image = make_card(thumbnail, evidence)
                    atomic_write(card, lambda tmp, ds=image: ds.save_as(str(tmp), write_like_original=False))
            if store and row["path"] not in stored:
                datasets = [pydicom.dcmread(str(f)) for f in (path, card) if f.is_file()]
                client.store_instances(datasets)
                record = {
                    "path": row["path"],
                    "sr": str(path),
                    "sop_instance_uids": [str(d.SOPInstanceUID) for d in datasets],
                    "at": time.time(),
                }
                with open(stored_log, "a") as f:
                    f.write(json.dumps(record) + "\n")
                    f.flush()
                    os.fsync(f.fileno())
                stored[row["path"]] = record
                counts["stored"] += 1
        except Exception as err:  # noqa: BLE001 - the table is the product; an SR is a copy of a row
            counts["failed"] += 1
            logger.error("structured report for %s failed: %s", row["path"], err)
    logger.info("structured reports: %s", counts)
    return counts
