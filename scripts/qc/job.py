"""The batch QC job: a motion probability, a decision and a picture for every scan of a batch
(see the package's documentation, :mod:`scripts.qc`)."""

from __future__ import annotations

import json
import logging
import math
import os
import time
import traceback
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from scripts import performance
from scripts.common.files import atomic_write
from scripts.common.statuses import SCORED_STATUSES
from scripts.common.values import as_bool, as_probability, as_seconds

from .inputs import collect_inputs
from .journal import JOURNAL, lock_output, read_journal, read_qc_table, repair_journal, write_table
from .loader import ScanLoader
from .report import render_thumbnail, thumbnail_name, write_report
from .saliency import GradCAMScorer, OcclusionMap
from .scheduler import LoadScheduler

__all__ = ["QCJob", "bundle_version"]

logger = logging.getLogger(__name__)


def bundle_version(bundle_root: str | os.PathLike = ".") -> str:
    """The version of ``<bundle_root>/configs/metadata.json``, else of this package's bundle, else ``unknown``
    (read by :func:`scripts.package.bundle_version`)."""
    from scripts.package import bundle_version as read_version

    for root in (Path(bundle_root), Path(__file__).resolve().parents[2]):
        try:
            return read_version(root)
        except (OSError, ValueError):
            continue
    return "unknown"


class QCJob:
    """Batch QC of every input: never dies on a scan, resumable, one TSV + one HTML report.

    Args:
        input: what :func:`collect_inputs` takes. datalist_key: split of a datalist input.
        network: the classifier (logits of shape (B, num_classes)).
        output_dir: where ``qc.tsv``, ``qc_report.html``, ``qc_thumbnails/`` and ``.qc/`` (journal) go.
        loader: a :class:`ScanLoader`.
        ckpt_path: weights, loaded into ``network`` after the integrity check of
            :func:`scripts.integrity.verify_file` (``bundle_root``'s ``large_files.yml``); None: use as is.
        bundle_root: bundle root (integrity check, version).
        threshold: decision threshold on the motion probability.
        device: network device. batch_size: scans per forward pass. num_workers: preprocessing
            worker processes (0: in the main process). prefetch_factor: batches each worker prepares ahead.
        motion_index: class index of motion.
        inferer: optional MONAI inferer ``inferer(inputs, network)``.
        saliency: ``"gradcam"`` (MONAI GradCAM on ``saliency_layer``), ``"occlusion"`` (MONAI
            OcclusionSensitivity, slower) or ``"none"``.
        saliency_layer: the module Grad-CAM explains; None: the one the network declares (its
            ``saliency_layer`` attribute, see :mod:`scripts.networks`); a network declaring none
            (ViT3D) is scored without saliency maps.
        thumbnails: write a JPEG per scored scan (three central slices + saliency) for the report.
        report: write ``qc_report.html`` at the end (rank 0).
        progress: tqdm progress bar (rate, ETA) on stderr.
        flush_every: rewrite ``qc.tsv`` every this many new rows (it is always written at the end).
        strict: raise ``SystemExit(3)`` at the end when an input failed.
        multiprocessing_context: worker start method (None: the platform default).
        scan_time_limit: seconds one scan may take to load and preprocess in a worker (None or 0: no limit);
            over it, the workers are stopped and the scan retried alone, then recorded ``timed_out``
            (:class:`scripts.qc.scheduler.LoadScheduler`). Needs ``num_workers >= 1``.
        channels_last: network and inputs in channels-last 3D memory (faster Conv3d on CPU; same results
            within float rounding).
        tune_allocator: :func:`scripts.performance.tune_allocator` at the start of :meth:`run` (a process
            setting, inherited by the preprocessing workers; a no-op off Linux/glibc).
        rank, world_size: shard of this process (default: from ``torch.distributed`` when
            initialised, else 0 of 1). Rank 0 merges every rank's journal into the TSV.
    """

    def __init__(
        self,
        input: Any,
        network: torch.nn.Module,
        output_dir: str | os.PathLike,
        loader: ScanLoader,
        ckpt_path: str | os.PathLike | None = None,
        bundle_root: str | os.PathLike = ".",
        threshold: float = 0.5,
        datalist_key: str = "test",
        device: str | torch.device = "cpu",
        batch_size: int = 1,
        num_workers: int = 2,
        prefetch_factor: int = 2,
        motion_index: int = 1,
        inferer: Callable | None = None,
        saliency: str = "gradcam",
        saliency_layer: str | None = None,
        thumbnails: bool = True,
        report: bool = True,
        report_page_size: int = 50,
        progress: bool = True,
        flush_every: int = 200,
        strict: bool = False,
        multiprocessing_context: str | None = None,
        scan_time_limit: float | str | None = 600.0,
        rank: int | None = None,
        world_size: int | None = None,
        channels_last: bool = True,
        tune_allocator: bool = True,
    ) -> None:
        if saliency not in ("gradcam", "occlusion", "none"):
            raise ValueError(f"saliency must be 'gradcam', 'occlusion' or 'none', got {saliency!r}.")
        self.input = input
        self.datalist_key = datalist_key
        self.network = network
        self.output_dir = Path(output_dir)
        self.state_dir = self.output_dir / ".qc"
        self.loader = loader
        self.ckpt_path = ckpt_path
        self.bundle_root = bundle_root
        self.threshold = as_probability(threshold, "threshold")
        self.device = torch.device(device)
        self.batch_size = max(1, int(batch_size))
        self.num_workers = max(0, int(num_workers))
        self.prefetch_factor = max(1, int(prefetch_factor))
        self.motion_index = int(motion_index)
        self.inferer = inferer
        self.saliency = saliency
        # the network declares its own Grad-CAM layer (scripts.networks); an argument overrides it
        self.saliency_layer = saliency_layer or getattr(network, "saliency_layer", None)
        if self.saliency == "gradcam" and not self.saliency_layer:
            logger.warning(
                "%s declares no saliency layer for Grad-CAM; scoring without saliency maps.", type(network).__name__
            )
            self.saliency = "none"
        self.thumbnails = as_bool(thumbnails, "thumbnails")
        self.report = as_bool(report, "report")
        self.report_page_size = int(report_page_size)
        self.progress = as_bool(progress, "progress")
        self.flush_every = max(1, int(flush_every))
        self.strict = as_bool(strict, "strict")
        self.multiprocessing_context = multiprocessing_context
        self.scan_time_limit = as_seconds(scan_time_limit, "scan_time_limit")
        self.channels_last = as_bool(channels_last, "channels_last")
        self.tune_allocator = as_bool(tune_allocator, "tune_allocator")
        dist_on = torch.distributed.is_available() and torch.distributed.is_initialized()
        self.rank = int(rank) if rank is not None else (torch.distributed.get_rank() if dist_on else 0)
        self.world_size = (
            int(world_size) if world_size is not None else (torch.distributed.get_world_size() if dist_on else 1)
        )
        self.model_sha256 = ""
        self.version = bundle_version(bundle_root)
        self._journal_file: Any = None
        self._lock: Any = None
        self._bar: Any = None
        self._new_rows = 0
        self._gradcam_scorer: GradCAMScorer | None = None
        self._occlusion_map: OcclusionMap | None = None

    # -- setup ---------------------------------------------------------------------------------
    def _load_weights(self) -> None:
        from scripts.integrity import file_hash, verify_file

        if self.ckpt_path is None:
            self.model_sha256 = "untrained"
        else:
            verify_file(self.ckpt_path, self.bundle_root)  # WeightIntegrityError: fatal
            state = torch.load(self.ckpt_path, map_location=self.device, weights_only=True)
            self.network.load_state_dict(state)
            self.model_sha256 = file_hash(self.ckpt_path)
        performance.channels_last(self.network.to(self.device).eval(), self.channels_last)

    @property
    def table_path(self) -> Path:
        return self.output_dir / "qc.tsv"

    # -- main ----------------------------------------------------------------------------------
    def run(self) -> dict[str, int]:
        """Process every input not yet recorded; returns ``{status: count}`` over all inputs."""
        items = collect_inputs(self.input, self.datalist_key)  # FileNotFoundError: fatal
        performance.tune_allocator(self.tune_allocator)
        self._load_weights()
        self.state_dir.mkdir(parents=True, exist_ok=True)
        (self.output_dir / "qc_thumbnails").mkdir(parents=True, exist_ok=True)
        shard = items[self.rank :: self.world_size]
        done = self._recorded()
        if self.thumbnails:  # a scored row whose thumbnail was lost is redone (same model: same row)
            thumbs = self.output_dir / "qc_thumbnails"
            done = {
                k: r
                for k, r in done.items()
                if r.get("status") not in SCORED_STATUSES or (thumbs / thumbnail_name(k)).is_file()
            }
        pending = [it for it in shard if it["image"] not in done]
        logger.info(
            "QC rank %d/%d: %d inputs in this shard, %d already recorded, %d to do (%d in total).",
            self.rank,
            self.world_size,
            len(shard),
            len(shard) - len(pending),
            len(pending),
            len(items),
        )
        if pending:  # computed once here, inherited by forked workers
            self.loader.warm_up()
        self._lock = lock_output(self.state_dir, self.rank)  # RuntimeError: another job writes here
        journal = self.state_dir / JOURNAL.format(rank=self.rank)
        repair_journal(journal)
        self._journal_file = open(journal, "a")
        if self.progress:
            from tqdm import tqdm

            self._bar = tqdm(
                total=len(shard),
                initial=len(shard) - len(pending),
                desc=f"QC rank {self.rank}",
                unit="scan",
                dynamic_ncols=True,
                position=self.rank,
            )
        try:
            LoadScheduler(
                self.loader,
                score=self._score_and_record,
                fail=lambda item, code, reason: self._record(self._failure(item, code, reason)),
                state_dir=self.state_dir,
                rank=self.rank,
                batch_size=self.batch_size,
                num_workers=self.num_workers,
                prefetch_factor=self.prefetch_factor,
                multiprocessing_context=self.multiprocessing_context,
                time_limit=self.scan_time_limit,
            ).run(pending)
        finally:
            self._journal_file.close()
            if self._bar is not None:
                self._bar.close()
        if self.world_size > 1:
            torch.distributed.barrier()
        counts: dict[str, int] = {}
        missing = 0
        if self.rank == 0:
            rows = self._write_outputs(items)
            for row in rows:
                counts[row["status"]] = counts.get(row["status"], 0) + 1
            missing = len(items) - len(rows)
            logger.info("QC finished: %d inputs, %s; table %s", len(rows), counts, self.table_path)
        if self.world_size > 1:
            torch.distributed.barrier()
        self._lock.close()  # releases the output folder
        self._lock = None
        if missing:  # never a silent success with an input lacking its row
            raise SystemExit(4)
        if self.strict and any(s not in SCORED_STATUSES for s in counts):
            raise SystemExit(3)
        return counts

    # -- inference -----------------------------------------------------------------------------
    def _to_device(self, x: torch.Tensor) -> torch.Tensor:
        """A (B, C, X, Y, Z) batch on the network's device as a plain tensor (a MetaTensor's metadata would
        be carried through every operation), in channels-last 3D memory when enabled."""
        from monai.data import MetaTensor

        x = (x.as_tensor() if isinstance(x, MetaTensor) else x).to(self.device)
        return x.contiguous(memory_format=performance.CHANNELS_LAST) if self.channels_last and x.ndim == 5 else x

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self._to_device(x)
        with torch.no_grad():
            logits = self.inferer(x, self.network) if self.inferer is not None else self.network(x)
            return torch.softmax(logits.float(), dim=1)[:, self.motion_index].cpu()

    def _score(self, batch: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Motion probabilities (and thumbnails) of the scored items of ``batch``; failures become statuses."""
        scored = [r for r in batch if r["status"] in SCORED_STATUSES]
        if scored:
            start = time.perf_counter()
            maps: dict[int, np.ndarray | None] = {}
            if self.thumbnails and self.saliency == "gradcam":  # one pass gives probability and map
                results = []
                for r in scored:
                    try:
                        prob, maps[id(r)] = self._gradcam(r["image"])
                        results.append((prob, "", ""))
                    except Exception as err:  # noqa: BLE001 - fall back to a plain forward pass
                        logger.warning("Grad-CAM failed for %s (%s); scoring without saliency.", r["path"], err)
                        self._free_memory()
                        results.append(self._score_one(r))
            else:
                try:
                    probs = self._forward(torch.stack([r["image"] for r in scored])).tolist()
                    results = [(p, "", "") for p in probs]
                except Exception:  # noqa: BLE001 - retried one by one below
                    self._free_memory()
                    results = [self._score_one(r) for r in scored]
            share = (time.perf_counter() - start) / len(scored)
            for r, (prob, code, reason) in zip(scored, results):
                r["seconds"] += share
                if prob is None:
                    r.update(status=code, reason=reason)
                    continue
                if not math.isfinite(prob):  # a broken network must not read as "no motion"
                    r.update(status="inference_failed", reason=f"the network's motion probability is {prob}")
                    continue
                r["prob_motion"] = prob
                if self.thumbnails:
                    t = time.perf_counter()
                    self._thumbnail(r, maps[id(r)] if id(r) in maps else self._occlusion(r))
                    r["seconds"] += time.perf_counter() - t
        for r in batch:
            r.pop("image", None)
        return batch

    def _score_one(self, r: dict[str, Any]) -> tuple[float | None, str, str]:
        try:
            return float(self._forward(r["image"][None])[0]), "", ""
        except Exception as err:  # noqa: BLE001
            self._free_memory()
            if isinstance(err, (torch.OutOfMemoryError, MemoryError)) or "out of memory" in str(err).lower():
                return None, "out_of_memory", f"{type(err).__name__}: {str(err).splitlines()[0][:300]}"
            last = traceback.format_exception_only(type(err), err)[-1].strip()
            return None, "inference_failed", last[:500]

    def _free_memory(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def _score_and_record(self, batch: list[dict[str, Any]]) -> None:
        for row in self._score(batch):
            self._record(row)

    def _gradcam(self, image: torch.Tensor) -> tuple[float, np.ndarray]:
        """Motion probability and Grad-CAM map ((X, Y, Z), [0, 1]) of one (1, X, Y, Z) image."""
        if self._gradcam_scorer is None:
            self._gradcam_scorer = GradCAMScorer(self.network, self.saliency_layer, self.motion_index)
        return self._gradcam_scorer(self._to_device(image[None]))

    def _occlusion(self, r: dict[str, Any]) -> np.ndarray | None:
        """Occlusion-sensitivity map of a scored record, or None (saliency off, or it failed)."""
        if self.saliency != "occlusion":
            return None
        try:
            if self._occlusion_map is None:
                self._occlusion_map = OcclusionMap(self.network, self.motion_index)
            return self._occlusion_map(self._to_device(r["image"][None]))
        except Exception as err:  # noqa: BLE001 - a picture must not fail the scan
            logger.warning("occlusion sensitivity failed for %s: %s", r["path"], err)
            return None

    def _thumbnail(self, r: dict[str, Any], saliency: np.ndarray | None) -> None:

        try:
            data = render_thumbnail(r["image"][0].numpy(), saliency)
            atomic_write(
                self.output_dir / "qc_thumbnails" / thumbnail_name(r["path"]), lambda tmp: tmp.write_bytes(data)
            )
        except Exception as err:  # noqa: BLE001
            logger.warning("thumbnail failed for %s: %s", r["path"], err)

    # -- recording -----------------------------------------------------------------------------
    @staticmethod
    def _failure(item: Mapping[str, Any], code: str, reason: str) -> dict[str, Any]:
        return {
            "path": item["image"],
            "participant_id": item.get("participant_id", ""),
            "session_id": item.get("session_id", ""),
            "status": code,
            "reason": reason,
            "input_space": "",
            "seconds": 0.0,
        }

    def _row(self, r: Mapping[str, Any]) -> dict[str, Any]:
        prob = r.get("prob_motion")
        scored = r["status"] in SCORED_STATUSES and prob is not None
        return {
            "participant_id": r.get("participant_id", ""),
            "session_id": r.get("session_id", ""),
            "path": r["path"],
            "status": r["status"],
            "reason": " ".join(str(r.get("reason", "")).split()),
            "prob_motion": f"{float(prob):.6f}" if scored else "",
            "decision": ("motion" if float(prob) >= self.threshold else "no_motion") if scored else "",
            "threshold": f"{self.threshold:g}",
            "input_space": r.get("input_space", ""),
            "model_sha256": self.model_sha256,
            "bundle_version": self.version,
            "seconds": f"{float(r.get('seconds', 0.0)):.3f}",
        }

    def _record(self, r: Mapping[str, Any]) -> None:
        row = self._row(r)
        self._journal_file.write(json.dumps({**row, "recorded_at": round(time.time(), 3)}) + "\n")
        self._journal_file.flush()
        os.fsync(self._journal_file.fileno())
        if self._bar is not None:
            self._bar.update(1)
            self._bar.set_postfix_str(f"{Path(row['path']).name[:30]}: {row['status']}", refresh=False)
        self._new_rows += 1
        if self.world_size == 1 and self._new_rows % self.flush_every == 0:
            write_table(self._merged(None), self.table_path)

    def _recorded(self) -> dict[str, dict[str, Any]]:
        """Rows already recorded with the current model (journals, then an existing ``qc.tsv``)."""
        done = read_journal(self.state_dir, self.model_sha256)
        if self.table_path.is_file():  # rows of an older run whose journal was removed
            for row in read_qc_table(self.table_path):
                if row.get("model_sha256") == self.model_sha256:
                    done.setdefault(row["path"], row)
        return done

    def _merged(self, items: list[dict[str, Any]] | None) -> list[dict[str, Any]]:
        """Recorded rows (of ``items``, in their order), decisions redone with the current threshold."""
        done = self._recorded()
        rows = list(done.values()) if items is None else [done[it["image"]] for it in items if it["image"] in done]
        out = []
        for row in rows:
            row = dict(row)
            if row.get("prob_motion") not in (None, ""):
                row["decision"] = "motion" if float(row["prob_motion"]) >= self.threshold else "no_motion"
            row["threshold"] = f"{self.threshold:g}"
            out.append(row)
        return out

    def _write_outputs(self, items: list[dict[str, Any]]) -> list[dict[str, Any]]:
        rows = self._merged(items)
        missing = len(items) - len(rows)
        if missing:
            logger.error("%d inputs have no row (a rank failed?); re-run to complete the table.", missing)
        write_table(rows, self.table_path)
        if self.report:
            try:
                write_report(
                    rows,
                    self.output_dir / "qc_report.html",
                    self.output_dir / "qc_thumbnails",
                    threshold=self.threshold,
                    page_size=self.report_page_size,
                )
            except Exception as err:  # noqa: BLE001 - the table is the product; the report is a view of it
                logger.error("could not write the HTML report: %s", err)
        return rows
