"""Batch quality control: a motion probability, a decision and a picture for every scan of a batch.

The job behind ``configs/inference.yaml``. It takes a folder (searched recursively), a BIDS dataset,
a CSV/TSV list or a datalist, and writes one TSV per run, ``<output_dir>/qc.tsv``, with one row per
input (see :data:`TSV_COLUMNS`) and an HTML report (:mod:`scripts.qc.report`).

It never dies on one scan: every input ends with a row whose ``status`` is ``ok``, ``warning``
(scored, with a caveat in ``reason``) or an error code of :data:`QC_STATUSES` (not scored). It is
resumable: results go to an append-only journal (one JSON line per scan, flushed and fsynced) and
the TSV is rewritten atomically from it; a re-run skips what is recorded, so a run killed at any
moment restarts and ends with every input exactly once. A scan whose processing killed a worker
process (or the whole job, e.g. the out-of-memory killer) is retried alone; if it dies alone twice it
is recorded as ``worker_crashed``.

Pipeline per scan (in worker processes, overlapping with inference in the main process):
read (ITK: NIfTI, MetaImage, NRRD, DICOM series folder; reoriented to RAS) -> input checks ->
t1-linear space? (shape and affine, or ``input_space``) else T1Linear preprocessing (N4 + affine to
MNI) -> brain checks in t1-linear space -> the config's intensity normalisation. The main process
batches the scans through the network, adds a Grad-CAM saliency map and writes a thumbnail. On CPU the
network and its inputs are in channels-last 3D memory and glibc keeps freed memory for reuse
(:mod:`scripts.performance`, docs/performance.md); both are switches of :class:`QCJob`.

Exit code of ``python -m monai.bundle run --config_file configs/inference.yaml``: 0 when every input
has its row (whatever the statuses); 1 on a fatal problem before any scan is processed (``--input``
does not exist, weights fail their integrity check, bad config); 3 with ``--strict true`` when at
least one input failed (rows are still all written); 4 when an input has no row (re-run to complete).

The package, bottom to top (each module imports only those above it in this list, and
:mod:`scripts.common`):

- :mod:`~scripts.qc.errors`: the row statuses and :class:`QCError`;
- :mod:`~scripts.qc.inputs`: what the job is pointed at, through the bundle's one input resolver;
- :mod:`~scripts.qc.loader`: :class:`ScanLoader`, one scan from path to normalised tensor, in a worker;
- :mod:`~scripts.qc.journal`: journal, attempts log, output lock, ``qc.tsv``;
- :mod:`~scripts.qc.scheduler`: worker processes, batching, crash isolation;
- :mod:`~scripts.qc.saliency`: Grad-CAM and occlusion maps;
- :mod:`~scripts.qc.report`: thumbnails and the HTML report;
- :mod:`~scripts.qc.job`: :class:`QCJob`, which ties them together (``configs/inference.yaml``'s ``qc``).
"""

from .errors import QC_STATUSES, SCORED_STATUSES, QCError
from .inputs import collect_inputs
from .job import QCJob, bundle_version
from .journal import TSV_COLUMNS, read_journal, read_qc_table
from .loader import ScanLoader, default_read_transforms
from .report import thumbnail_name, write_report

__all__ = [
    "QC_STATUSES",
    "SCORED_STATUSES",
    "TSV_COLUMNS",
    "QCError",
    "ScanLoader",
    "QCJob",
    "bundle_version",
    "collect_inputs",
    "default_read_transforms",
    "read_journal",
    "read_qc_table",
    "thumbnail_name",
    "write_report",
]
