"""The QC job's scheduler: scans loaded in worker processes (a window in flight, so preprocessing overlaps
inference), handed to the scorer in batches as they arrive, and crash isolation.

A scan whose processing killed a worker process (or the whole job, e.g. the out-of-memory killer) is
retried alone; if it dies alone twice it is recorded as ``worker_crashed``. Every start is logged in the
attempts log (:data:`scripts.qc.journal.ATTEMPTS`) before the scan is touched, so a restart knows which
scans were in flight when a run died. Workers die with their parent (Linux ``PR_SET_PDEATHSIG``).
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from .journal import ATTEMPTS, read_jsonl
from .loader import ScanLoader

__all__ = ["LoadScheduler", "WorkerDied", "ScanTimedOut"]

logger = logging.getLogger(__name__)


def _load_in_worker(loader: ScanLoader, item: Mapping[str, Any]) -> dict[str, Any]:
    """Run ``loader`` in a worker process; the image travels back as a numpy array."""
    out = loader(item)
    if "image" in out:
        out["image"] = out["image"].numpy()
    return out


def _die_with_parent(parent_pid: int) -> None:
    """Ask Linux to SIGKILL this worker when its parent dies (a killed QC job must not leave ~1 GB
    workers behind); exit at once if the parent is already gone. A no-op elsewhere."""
    import ctypes
    import signal
    import sys

    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(1, int(signal.SIGKILL), 0, 0, 0)  # PR_SET_PDEATHSIG = 1
        except (OSError, AttributeError):  # pragma: no cover - no prctl in this libc
            return
    if os.getppid() != parent_pid:  # the parent died before the request took effect
        os._exit(1)


def _worker_init(threads: int, parent_pid: int | None = None) -> None:
    if parent_pid is not None:
        _die_with_parent(parent_pid)
    try:
        import SimpleITK as sitk  # noqa: N813 - the alias of SimpleITK's own documentation

        sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(max(1, int(threads)))
    except ImportError:  # pragma: no cover
        pass
    torch.set_num_threads(1)


class WorkerDied(RuntimeError):
    """A worker process died: its pool is broken."""


class ScanTimedOut(WorkerDied):
    """A scan held a worker longer than the time limit; the workers were killed."""

    def __init__(self, path: str, seconds: float) -> None:
        super().__init__(f"{path} took more than {seconds:g} s")
        self.path, self.seconds = path, seconds


class LoadScheduler:
    """Load items with a :class:`ScanLoader` and hand them, in batches, to ``score``.

    Args:
        loader: the per-scan loader (never raises).
        score: called with a list of loaded records (``loader``'s outputs); scores and records them.
        fail: called as ``fail(item, status, reason)`` for an item that is given up (``worker_crashed``).
        state_dir: folder of the attempts log. rank: this process's rank (one attempts log per rank).
        batch_size: records per ``score`` call. num_workers: worker processes (0: in this process).
        prefetch_factor: items each worker prepares ahead. multiprocessing_context: start method (None: default).
        time_limit: seconds a scan may hold a worker (None: no limit). A scan over the limit has its workers
            killed (C readers and ITK cannot be interrupted otherwise) and is retried alone; over the limit
            alone it is given up as ``timed_out``. Applies with worker processes only (``num_workers >= 1``).
    """

    def __init__(
        self,
        loader: ScanLoader,
        score: Callable[[list[dict[str, Any]]], None],
        fail: Callable[[Mapping[str, Any], str, str], None],
        state_dir: str | os.PathLike,
        rank: int = 0,
        batch_size: int = 1,
        num_workers: int = 2,
        prefetch_factor: int = 2,
        multiprocessing_context: str | None = None,
        time_limit: float | None = None,
    ) -> None:
        self.loader = loader
        self.score = score
        self.fail = fail
        self.state_dir = Path(state_dir)
        self.rank = int(rank)
        self.batch_size = max(1, int(batch_size))
        self.num_workers = max(0, int(num_workers))
        self.prefetch_factor = max(1, int(prefetch_factor))
        self.multiprocessing_context = multiprocessing_context
        self.time_limit = float(time_limit) if time_limit else None

    @property
    def attempts_path(self) -> Path:
        return self.state_dir / ATTEMPTS.format(rank=self.rank)

    def attempts(self) -> dict[str, list[dict[str, Any]]]:
        """Records of the attempts logs (starts, and the crashes the main process saw), by path."""
        records: dict[str, list[dict[str, Any]]] = {}
        for path in sorted(self.state_dir.glob("attempts-rank*.jsonl")):
            for record in read_jsonl(path):
                records.setdefault(record["path"], []).append(record)
        return records

    def crashes_alone(self, key: str) -> int:
        """Times the scan ``key`` killed the process handling it while it was processed alone: crashes of
        a worker that this process saw, and in-process starts (a crash there kills this process too) that
        were not interrupted. A job killed or interrupted while a worker held the scan does not count."""
        count = 0
        for record in self.attempts().get(key, []):
            if record.get("crashed"):
                count += 1
            elif record.get("isolated") and not record.get("in_worker"):
                count += 1
            elif record.get("interrupted"):
                count -= 1
        return count

    def _log_attempt(self, key: str, **outcome: Any) -> None:
        with open(self.attempts_path, "a") as f:
            f.write(json.dumps({"path": key, **outcome}) + "\n")

    def run(self, pending: list[dict[str, Any]]) -> None:
        """Load and score every item of ``pending``; scans in flight when an earlier run died go first,
        one at a time."""
        self.loader.attempts_path = str(self.attempts_path)
        remaining = {it["image"]: it for it in pending}
        starts = self.attempts()
        suspects = [k for k in remaining if k in starts]
        while remaining:
            for key in suspects:
                while key in remaining:
                    if self.crashes_alone(key) >= 2:  # killed its process twice while alone
                        reason = "the process handling this scan died twice while it was processed alone"
                        self.fail(remaining.pop(key), "worker_crashed", reason)
                        break
                    try:
                        self._load([remaining[key]], isolated=True, remaining=remaining)
                    except ScanTimedOut as err:
                        reason = (
                            f"loading and preprocessing took more than {err.seconds:g} s with the scan alone; stopped"
                        )
                        self.fail(remaining.pop(key), "timed_out", reason)
                    except WorkerDied as err:
                        self._log_attempt(key, crashed=True)
                        logger.warning("a worker died on %s alone (%s); retrying once.", key, err)
                    except KeyboardInterrupt:
                        if self.num_workers == 0:  # the in-process start above was the user's, not the scan's
                            self._log_attempt(key, interrupted=True)
                        raise
            if not remaining:
                break
            try:
                self._load(list(remaining.values()), isolated=False, remaining=remaining)
            except WorkerDied as err:
                starts = self.attempts()
                suspects = [k for k in remaining if k in starts]
                logger.warning(
                    "a preprocessing worker died (%s); %d in-flight scans are retried alone.", err, len(suspects)
                )

    def _score(self, batch: list[dict[str, Any]], remaining: dict[str, Any]) -> None:
        self.score(batch)
        for r in batch:
            remaining.pop(r["path"], None)

    def _load(self, items: list[dict[str, Any]], isolated: bool, remaining: dict[str, Any]) -> None:
        """Load ``items`` (in worker processes: a window of ``num_workers * prefetch_factor`` in flight)
        and score them in batches as they arrive.

        Raises:
            WorkerDied: a worker process died (its pool is broken); the caller isolates suspects.
        """
        self.loader.isolated = isolated
        self.loader.in_worker = self.num_workers > 0
        batch_size = 1 if isolated else self.batch_size
        if self.num_workers == 0:
            for start in range(0, len(items), batch_size):
                self._score([self.loader(it) for it in items[start : start + batch_size]], remaining)
            return
        import multiprocessing
        from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

        workers = 1 if isolated else self.num_workers
        window = 1 if isolated else workers * self.prefetch_factor
        threads = max(1, (os.cpu_count() or 1) // workers)
        context = multiprocessing.get_context(self.multiprocessing_context)
        pool = ProcessPoolExecutor(
            workers, mp_context=context, initializer=_worker_init, initargs=(threads, os.getpid())
        )
        queue = iter(items)
        inflight: dict[Any, dict[str, Any]] = {}
        ready: list[dict[str, Any]] = []
        clock = _StartClock(self.attempts_path) if self.time_limit else None
        poll = min(5.0, self.time_limit / 4) if self.time_limit else None
        try:
            while True:
                while len(inflight) < window:
                    item = next(queue, None)
                    if item is None:
                        break
                    inflight[pool.submit(_load_in_worker, self.loader, item)] = item
                if not inflight:
                    break
                done, _ = wait(list(inflight), timeout=poll, return_when=FIRST_COMPLETED)
                late = (
                    clock.overdue([it["image"] for f, it in inflight.items() if f not in done], self.time_limit)
                    if clock
                    else None
                )
                if late is not None:  # a hung read or a runaway registration: stop the workers
                    for process in list(getattr(pool, "_processes", {}).values()):
                        process.kill()
                    for start in range(0, len(ready), batch_size):  # keep what already arrived
                        self._score(ready[start : start + batch_size], remaining)
                    raise ScanTimedOut(late, self.time_limit)
                for future in done:
                    inflight.pop(future)
                    try:
                        out = future.result()
                    except Exception as err:  # noqa: BLE001 - the loader never raises: the pool broke
                        for start in range(0, len(ready), batch_size):  # keep what already arrived
                            self._score(ready[start : start + batch_size], remaining)
                        raise WorkerDied(f"{type(err).__name__}: {err}") from None
                    if "image" in out:
                        out["image"] = torch.from_numpy(out["image"])
                    ready.append(out)
                while len(ready) >= batch_size or (ready and not inflight):
                    self._score(ready[:batch_size], remaining)
                    ready = ready[batch_size:]
        finally:
            pool.shutdown(wait=True, cancel_futures=True)


class _StartClock:
    """When the scans of this pass started in a worker: the start records that the loader appends to the
    attempts log (read incrementally; records older than this pass are ignored)."""

    def __init__(self, attempts_path: Path) -> None:
        self.path = Path(attempts_path)
        self.since = time.time()
        self.offset = self.path.stat().st_size if self.path.is_file() else 0
        self.started: dict[str, float] = {}

    def overdue(self, paths: list[str], limit: float) -> str | None:
        """The first of ``paths`` that started more than ``limit`` seconds ago, or None."""
        if self.path.is_file():
            with open(self.path, "rb") as f:
                f.seek(self.offset)
                chunk = f.read()
            complete = chunk.rfind(b"\n") + 1  # a line being written is read next time
            self.offset += complete
            for line in chunk[:complete].splitlines():
                try:
                    record = json.loads(line)
                except ValueError:
                    continue
                if isinstance(record, dict) and record.get("started", 0) >= self.since - 1:
                    self.started[str(record.get("path"))] = float(record["started"])
        now = time.time()
        return next((p for p in paths if p in self.started and now - self.started[p] > limit), None)
