"""Ignite handlers and engine-output helpers used by the bundle's configs."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from ignite.engine import Engine, Events

from scripts.common.files import atomic_write, write_json_atomic, write_rows_atomic
from scripts.metrics import binary_metrics, evaluation_statistics, save_roc_plot, write_threshold
from scripts.transforms import image_source

__all__ = ["stack_output", "PredictionWriter", "EvaluationWriter", "TrainingCheckpoint", "LearningCurve"]

logger = logging.getLogger(__name__)


def stack_output(
    keys: Sequence[str] = ("pred", "label"), channel: int | None = None
) -> Callable[[Any], tuple[torch.Tensor, ...]]:
    """An ignite ``output_transform`` that stacks decollated engine outputs into batch tensors.

    MONAI engines decollate their output into a list of per-sample dicts; ignite metrics such as
    ``Loss`` and ``Accuracy`` want ``(y_pred, y)`` batch tensors. Labels are returned as long
    tensors of shape (B,). With ``channel``, the first key keeps only that class column, shape (B,)
    (e.g. the motion probability for a binary ROC AUC).
    """

    def _transform(output: Any) -> tuple[torch.Tensor, ...]:
        items = output if isinstance(output, list) else [output]
        stacked = []
        for key in keys:
            values = [torch.as_tensor(item[key]) for item in items]
            t = torch.stack(values) if values[0].ndim else torch.stack(values).reshape(-1)
            if key == "label":
                t = t.long().reshape(-1)
            else:
                t = t.float()
                if channel is not None and not stacked:
                    t = t[:, channel]
            stacked.append(t)
        return tuple(stacked)

    return _transform


class PredictionWriter:
    """Collect per-image motion probabilities during an evaluator run and write them at the end.

    Writes ``<output_dir>/<filename>`` with columns ``image, participant_id, session_id, [label,]
    prob_motion, prediction``, where ``prediction = int(prob_motion >= threshold)``. With
    ``with_metrics`` (labels known), also ``metrics.json`` from :func:`scripts.metrics.binary_metrics`.
    Files are written atomically at the end of each run, so a killed run leaves no half file.

    Args:
        output_dir: folder of the outputs.
        filename: name of the predictions CSV.
        prob_key: engine-output key of the per-class probabilities (after softmax).
        motion_index: index of the motion class in those probabilities.
        threshold: decision threshold on the motion probability.
        with_metrics: compute and write metrics from the ``label`` of each sample.
    """

    def __init__(
        self,
        output_dir: str | os.PathLike,
        filename: str = "predictions.csv",
        prob_key: str = "prob",
        motion_index: int = 1,
        threshold: float = 0.5,
        with_metrics: bool = False,
    ) -> None:
        self.output_dir = Path(output_dir)
        self.filename = filename
        self.prob_key = prob_key
        self.motion_index = motion_index
        self.threshold = float(threshold)
        self.with_metrics = with_metrics
        self.rows: list[dict[str, Any]] = []

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_STARTED, self._reset)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._collect)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self._write)

    def _reset(self, engine: Engine) -> None:
        self.rows = []

    def _collect(self, engine: Engine) -> None:
        outputs = engine.state.output if isinstance(engine.state.output, list) else [engine.state.output]
        batch = engine.state.batch if isinstance(engine.state.batch, list) else [engine.state.batch]
        for out, data in zip(outputs, batch):
            prob = float(torch.as_tensor(out[self.prob_key]).reshape(-1)[self.motion_index])
            row: dict[str, Any] = {
                "image": image_source(data.get("image")),
                "participant_id": data.get("participant_id", ""),
                "session_id": data.get("session_id", ""),
                "prob_motion": f"{prob:.6f}",
                "prediction": int(prob >= self.threshold),
            }
            if self.with_metrics:
                row["label"] = int(torch.as_tensor(data["label"]).reshape(-1)[0])
            self.rows.append(row)

    def _write(self, engine: Engine) -> None:
        fields = ["image", "participant_id", "session_id"] + (["label"] if self.with_metrics else [])
        fields += ["prob_motion", "prediction"]
        path = write_rows_atomic(self.rows, self.output_dir / self.filename, fields)
        logger.info("wrote %d predictions to %s", len(self.rows), path)
        if self.with_metrics and self.rows:
            metrics = binary_metrics(
                [r["label"] for r in self.rows], [float(r["prob_motion"]) for r in self.rows], self.threshold
            ).as_dict()
            write_json_atomic(metrics, self.output_dir / "metrics.json")
            summary = ", ".join(
                f"{name} {metrics[name]:.3f}" if metrics[name] is not None else f"{name} undefined"
                for name in ("balanced_accuracy", "sensitivity", "specificity", "roc_auc")
            )
            logger.info("metrics on %d images: %s", metrics["n"], summary)


class EvaluationWriter(PredictionWriter):
    """:class:`PredictionWriter` plus the statistics of the papers, for labelled evaluation runs.

    Besides ``predictions.csv`` and ``metrics.json`` it writes, in ``output_dir``:

    - ``statistics.json``: percentile bootstrap confidence intervals of balanced accuracy,
      sensitivity, specificity and ROC AUC (motion positive), expected calibration error of the
      motion probability, and a threshold choice;
    - ``roc.png``: the ROC curve with the AUC and the operating point of ``threshold``;
    - ``threshold.json``: the chosen threshold (Youden, or the best sensitivity at a fixed
      specificity), which inference reads with ``scripts.metrics.read_threshold``. Choose it on the
      validation split and apply it to the test split.

    Args:
        n_bootstrap: bootstrap resamples. confidence: interval level (0.95).
        bootstrap_unit: ``"image"`` or ``"participant"`` (resample whole participants).
        seed: bootstrap seed. ece_bins: calibration bins.
        threshold_method: ``"youden"`` or ``"specificity"``. target_specificity: for the latter.
        Other arguments as :class:`PredictionWriter` (``with_metrics`` is forced on).
    """

    def __init__(
        self,
        output_dir: str | os.PathLike,
        filename: str = "predictions.csv",
        prob_key: str = "prob",
        motion_index: int = 1,
        threshold: float = 0.5,
        n_bootstrap: int = 1000,
        confidence: float = 0.95,
        bootstrap_unit: str = "image",
        seed: int = 0,
        ece_bins: int = 10,
        threshold_method: str = "youden",
        target_specificity: float = 0.9,
    ) -> None:
        super().__init__(output_dir, filename, prob_key, motion_index, threshold, with_metrics=True)
        if bootstrap_unit not in ("image", "participant"):
            raise ValueError(f"bootstrap_unit must be 'image' or 'participant', got {bootstrap_unit!r}.")
        self.n_bootstrap = int(n_bootstrap)
        self.confidence = float(confidence)
        self.bootstrap_unit = bootstrap_unit
        self.seed = int(seed)
        self.ece_bins = int(ece_bins)
        self.threshold_method = threshold_method
        self.target_specificity = float(target_specificity)

    def _write(self, engine: Engine) -> None:
        super()._write(engine)
        if not self.rows:
            return
        labels = [r["label"] for r in self.rows]
        probs = [float(r["prob_motion"]) for r in self.rows]
        groups = (
            [r["participant_id"] or r["image"] for r in self.rows] if self.bootstrap_unit == "participant" else None
        )
        statistics = evaluation_statistics(
            labels,
            probs,
            self.threshold,
            self.n_bootstrap,
            self.confidence,
            self.seed,
            groups,
            self.ece_bins,
            self.threshold_method,
            self.target_specificity,
        )
        write_json_atomic(statistics, self.output_dir / "statistics.json")
        if statistics["threshold_selection"] is not None:
            write_threshold(statistics["threshold_selection"], self.output_dir / "threshold.json")
        roc = save_roc_plot(labels, probs, self.output_dir / "roc.png", threshold=self.threshold)
        logger.info(
            "statistics (bootstrap CIs, ECE %.3f, threshold choice) written to %s%s",
            statistics["ece"],
            self.output_dir,
            "" if roc else " (no ROC plot: one class only)",
        )


class TrainingCheckpoint:
    """Resumable training: the whole trainer state saved every ``interval`` iterations, loaded at start.

    ``save_dict`` maps names to objects with ``state_dict``/``load_state_dict`` (the trainer itself,
    network, optimizer, scheduler). The file is written atomically (temporary file, then rename), so
    a run killed at any moment leaves the previous checkpoint intact; a restart with the same config
    continues from the saved iteration. After a load, torch's global seed is moved on by the
    iteration count so that a resumed run does not replay the random draws of the first one, and
    the optimizer keeps the learning rates of the current config (a restart can change them).

    With ``snapshot_interval``, the network state alone (``save_dict[snapshot_key]``) is also kept every
    ``snapshot_interval`` iterations as ``snapshot_dir/it000480.pt`` (a plain state dict, written atomically;
    a resumed run that reaches that iteration again replaces it): the checkpoints that
    ``python -m scripts.averaging`` averages. Each is the size of the
    network (170 MB for Conv5FC3 in float32), so they are off by default.

    Args:
        path: checkpoint file (e.g. ``runs/pretrain/last.pt``).
        save_dict: objects to save and restore.
        interval: iterations between saves (and one at the end of every epoch).
        seed: base seed for the reseeding after a load.
        snapshot_interval: iterations between kept snapshots of the network (0: none).
        snapshot_dir: where the snapshots go (default: ``snapshots/`` beside ``path``).
        snapshot_key: the entry of ``save_dict`` that is snapshotted.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        save_dict: dict[str, Any],
        interval: int = 50,
        seed: int = 0,
        snapshot_interval: int = 0,
        snapshot_dir: str | os.PathLike | None = None,
        snapshot_key: str = "model",
    ) -> None:
        if interval < 1:
            raise ValueError(f"TrainingCheckpoint: interval must be >= 1, got {interval}")
        if snapshot_interval < 0:
            raise ValueError(f"TrainingCheckpoint: snapshot_interval must be >= 0, got {snapshot_interval}")
        if snapshot_interval and snapshot_key not in save_dict:
            raise ValueError(
                f"TrainingCheckpoint: snapshot_key {snapshot_key!r} is not in save_dict {sorted(save_dict)}"
            )
        self.path = Path(path)
        self.save_dict = save_dict
        self.interval = int(interval)
        self.seed = int(seed)
        self.snapshot_interval = int(snapshot_interval)
        self.snapshot_dir = Path(snapshot_dir) if snapshot_dir else self.path.parent / "snapshots"
        self.snapshot_key = snapshot_key

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self.load)
        engine.add_event_handler(Events.ITERATION_COMPLETED(every=self.interval), self.save)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self.save)
        if self.snapshot_interval:
            engine.add_event_handler(Events.ITERATION_COMPLETED(every=self.snapshot_interval), self.snapshot)

    def snapshot(self, engine: Engine) -> Path:
        """Keep the network state of this iteration as ``snapshot_dir/it<iteration>.pt``."""
        self.snapshot_dir.mkdir(parents=True, exist_ok=True)
        state = self.save_dict[self.snapshot_key].state_dict()
        target = self.snapshot_dir / f"it{engine.state.iteration:06d}.pt"
        return atomic_write(target, lambda tmp: torch.save(state, tmp))

    def save(self, engine: Engine | None = None) -> Path:
        state = {name: obj.state_dict() for name, obj in self.save_dict.items()}
        return atomic_write(self.path, lambda tmp: torch.save(state, tmp))

    def load(self, engine: Engine | None = None) -> bool:
        """Restore everything from ``path`` if it exists; returns whether it did."""
        if not self.path.is_file():
            return False
        state = torch.load(self.path, map_location="cpu", weights_only=True)
        missing = sorted(set(self.save_dict) - set(state))
        if missing:
            raise ValueError(f"checkpoint {self.path} lacks {missing}; delete it to start afresh")
        for name, obj in self.save_dict.items():
            if isinstance(obj, Engine):  # keep this run's max_epochs: a longer run continues an earlier one
                max_epochs = obj.state.max_epochs
                obj.load_state_dict(state[name])
                obj.state.max_epochs = max_epochs
            elif isinstance(obj, torch.optim.Optimizer):  # the config's learning rates win over the saved ones
                rates = [group["lr"] for group in obj.param_groups]
                obj.load_state_dict(state[name])
                for group, lr in zip(obj.param_groups, rates):
                    group["lr"] = lr
            else:
                obj.load_state_dict(state[name])
        iteration = int(state.get("trainer", {}).get("iteration", 0))
        torch.manual_seed(self.seed + iteration)
        logger.info("resumed from %s at iteration %d", self.path, iteration)
        return True


class LearningCurve:
    """Append the learning curve to a TSV: the mean training loss every ``every`` iterations, and
    the validator's metrics after each validation (``attach`` to the trainer, ``attach_validator``
    to the evaluator). Columns: ``time, iteration, epoch, split, name, value``."""

    def __init__(self, path: str | os.PathLike, every: int = 10) -> None:
        self.path = Path(path)
        self.every = int(every)
        self._losses: list[float] = []
        self._trainer: Engine | None = None

    def _append(self, rows: list[tuple[Any, ...]]) -> None:
        import time

        self.path.parent.mkdir(parents=True, exist_ok=True)
        new = not self.path.exists()
        with self.path.open("a") as f:
            if new:
                f.write("time\titeration\tepoch\tsplit\tname\tvalue\n")
            for row in rows:
                f.write("\t".join(str(v) for v in (f"{time.time():.0f}", *row)) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def attach(self, engine: Engine) -> None:
        self._trainer = engine
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._on_iteration)

    def attach_validator(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_COMPLETED, self._on_validation)

    def for_validator(self) -> Any:
        """A handler (``attach(evaluator)``) that logs the validator's metrics into this curve."""
        curve = self

        class _ValidatorCurve:
            def attach(self, engine: Engine) -> None:
                curve.attach_validator(engine)

        return _ValidatorCurve()

    def _on_iteration(self, engine: Engine) -> None:
        out = engine.state.output
        items = out if isinstance(out, list) else [out]
        self._losses.append(float(torch.as_tensor(items[0]["loss"]).mean()))
        if engine.state.iteration % self.every == 0:
            loss = sum(self._losses) / len(self._losses)
            self._losses.clear()
            self._append([(engine.state.iteration, engine.state.epoch, "train", "loss", f"{loss:.5f}")])

    def _on_validation(self, engine: Engine) -> None:
        it = self._trainer.state.iteration if self._trainer else 0
        ep = self._trainer.state.epoch if self._trainer else 0
        rows = [
            (it, ep, "validation", k, f"{float(v):.5f}")
            for k, v in engine.state.metrics.items()
            if isinstance(v, (int, float)) or (torch.is_tensor(v) and v.numel() == 1)
        ]
        self._append(rows)
