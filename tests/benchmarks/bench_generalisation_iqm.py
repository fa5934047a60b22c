"""The held-out generalisation sets scored by the IQM baseline and by CNN + IQM combinations (prints a table).

Not part of the test run. Compares, on the sets of ``bench_generalisation.py`` (cached in ``--cache_dir``;
generate them first with ``bench_generalisation.py --generate_only``):

* the CNN alone (``--ckpt``, at the shipped threshold), as ``bench_generalisation.py`` scores it;
* the paper's baseline, a random forest on the 13 default MRQy IQMs (``scripts.iqm``);
* a random forest and a logistic regression on the CNN's logit and the same IQMs.

The three learned models are trained on synthetic heads of the pre-training distribution only: the
pre-training validation set (``--validation``, 64 heads of ``configs/pretrain.yaml``) and ``--n_train``
more heads generated here with pretrain.yaml's acquisition nuisances and other seeds. Their thresholds
are chosen by Youden's index on 5-fold out-of-fold predictions of those training heads. Features
(probability and IQMs of every image) are cached as JSON under ``--work``, so a second run only fits.

    python tests/benchmarks/bench_generalisation_iqm.py --cache_dir runs/heldout64 --n 64 --n_small 16
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from multiprocessing import get_context
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_generalisation import MAIN_SETS, SEVERITIES, load_detector, score, set_specs  # noqa: E402

from scripts.datalist import load_datalist  # noqa: E402
from scripts.iqm import DEFAULT_IQMS, load_volume, volume_iqms  # noqa: E402
from scripts.metrics import binary_metrics, choose_threshold, read_threshold  # noqa: E402

_TRAIN_SEED = 700_000  # far from the training's, the validation's and the held-out sets' seeds


def _iqms(path: str) -> dict[str, float]:
    torch.set_num_threads(1)
    return volume_iqms(load_volume(path), name=path)


def features(args: argparse.Namespace) -> dict[str, Path]:
    """Probability and IQMs of every image of the training and held-out sets, cached as JSON."""
    import yaml

    from scripts.performance import tune_allocator
    from scripts.synthetic_heads import make_synthetic_dataset

    tune_allocator()
    work = Path(args.work)
    acquisition = yaml.safe_load((ROOT / "configs" / "pretrain.yaml").read_text())["acquisition"]
    generated = make_synthetic_dataset(
        work / "train_heads",
        n=args.n_train,
        seed=_TRAIN_SEED,
        key="test",
        regime="train",
        simulators=["image", "kspace"],
        simulator_weights=[0.75, 0.25],
        severity=[0.8, 8.0],
        acquisition=acquisition,
    )
    sets = {"pretrain_validation": (Path(args.validation), "validation"), "train_heads": (generated, "test")}
    for name in set_specs(args.n, args.n_small):
        sets[name] = (Path(args.cache_dir) / f"{name}_vs1" / "datalist.json", "test")
    network, preprocessing = load_detector(args.ckpt, [169, 208, 179])
    out = {}
    with get_context("fork").Pool(2) as pool:
        for name, (datalist, key) in sets.items():
            out[name] = work / f"{name}.json"
            if out[name].is_file():
                continue
            items = load_datalist(datalist, key)
            t0 = time.perf_counter()
            as_test = work / f"{name}_as_test.json"  # score() reads the 'test' key
            as_test.write_text(json.dumps({"test": items}))
            prob, _ = score(as_test, network, preprocessing)
            iqms = pool.map(_iqms, [it["image"] for it in items], chunksize=4)  # both cores, after the CNN
            rows = [{"label": int(it["label"]), "p": float(p), **q} for it, p, q in zip(items, prob, iqms)]
            out[name].write_text(json.dumps(rows))
            print(f"  {name}: {len(rows)} images, {time.perf_counter() - t0:.0f} s", flush=True)
    return out


def _matrix(rows: list[dict], kind: str) -> np.ndarray:
    iqms = np.array([[r[k] for k in DEFAULT_IQMS] for r in rows], dtype=float)
    logit = np.array([[math.log(max(r["p"], 1e-7) / max(1.0 - r["p"], 1e-7))] for r in rows])
    return iqms if kind == "iqm" else np.hstack([logit, iqms])


def table(args: argparse.Namespace, paths: dict[str, Path]) -> None:
    from sklearn.ensemble import RandomForestClassifier
    from sklearn.impute import SimpleImputer
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score
    from sklearn.model_selection import StratifiedKFold, cross_val_predict
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    rows = {name: json.loads(path.read_text()) for name, path in paths.items()}
    train = rows["pretrain_validation"] + rows["train_heads"]
    y_train = np.array([r["label"] for r in train])

    def forest():
        return make_pipeline(
            SimpleImputer(strategy="median"),
            RandomForestClassifier(500, class_weight="balanced", min_samples_leaf=2, random_state=0, n_jobs=2),
        )

    def logistic():
        return make_pipeline(
            SimpleImputer(strategy="median"),
            StandardScaler(),
            LogisticRegression(max_iter=5000, class_weight="balanced"),
        )

    models = {"random forest, IQMs": ("iqm", forest), "random forest, CNN logit + IQMs": ("both", forest)}
    models["logistic, CNN logit + IQMs"] = ("both", logistic)
    sets = list(set_specs(args.n, args.n_small))
    labels = {s: np.array([r["label"] for r in rows[s]]) for s in sets}
    shipped = read_threshold(args.threshold, 0.5)
    columns = {f"CNN (threshold {shipped:.3f})": {s: np.array([r["p"] for r in rows[s]]) for s in sets}}
    thresholds = [shipped]
    for label, (kind, make) in models.items():
        x = _matrix(train, kind)
        folds = StratifiedKFold(5, shuffle=True, random_state=0)
        oof = cross_val_predict(make(), x, y_train, cv=folds, method="predict_proba")[:, 1]
        threshold = float(choose_threshold(y_train, oof, method="youden")["threshold"])
        model = make().fit(x, y_train)
        columns[f"{label} (threshold {threshold:.3f})"] = {
            s: model.predict_proba(_matrix(rows[s], kind))[:, 1] for s in sets
        }
        thresholds.append(threshold)
        print(f"{label}: out-of-fold AUC {roc_auc_score(y_train, oof):.3f} on the {y_train.size} training heads")

    def cell(prob: dict, threshold: float, names) -> str:
        y = np.concatenate([labels[s] for s in names])
        m = binary_metrics(y, np.concatenate([prob[s] for s in names]), threshold)
        return f"{m.balanced_accuracy:.3f} / {m.roc_auc:.3f}"

    print("\n| set | " + " | ".join(columns) + " |")
    print("|---|" + "---|" * len(columns))
    print("| overall (4 main sets) BA / AUC | " + " | ".join(
        cell(p, t, MAIN_SETS) for p, t in zip(columns.values(), thresholds)) + " |")  # fmt: skip
    for s in MAIN_SETS:
        print(f"| {s} BA / AUC | " + " | ".join(cell(p, t, [s]) for p, t in zip(columns.values(), thresholds)) + " |")
    levels = "/".join(f"{v:g}" for v in SEVERITIES)
    print(f"| severity {levels}: detected | " + " | ".join(
        " / ".join(f"{(p[f'severity_{v:g}'] >= t).mean():.2f}" for v in SEVERITIES)
        for p, t in zip(columns.values(), thresholds)) + " |")  # fmt: skip
    nuisances = [s for s in sets if s.startswith("nuisance_")]
    print("| false positives, " + " / ".join(s[len("nuisance_"):] for s in nuisances) + " (%) | " + " | ".join(
        " / ".join(f"{100 * (p[s] >= t).mean():.0f}" for s in nuisances)
        for p, t in zip(columns.values(), thresholds)) + " |")  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ckpt", default=str(ROOT / "models" / "model.pt"))
    parser.add_argument("--threshold", default=str(ROOT / "models" / "threshold.json"))
    parser.add_argument("--n", type=int, default=64, help="images per main held-out set, as generated")
    parser.add_argument("--n_small", type=int, default=16, help="images per severity level and nuisance")
    parser.add_argument("--cache_dir", default=str(ROOT / "runs" / "heldout64"))
    parser.add_argument("--validation", default=str(ROOT / "runs" / "pretrain" / "validation" / "datalist.json"))
    parser.add_argument("--n_train", type=int, default=160, help="training heads generated beside the validation")
    parser.add_argument("--work", default=str(ROOT / "runs" / "hybrid"))
    args = parser.parse_args(argv)
    Path(args.work).mkdir(parents=True, exist_ok=True)
    table(args, features(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
