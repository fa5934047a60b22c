"""Benchmark of CPU training throughput: the bundle's training step against plain PyTorch (not collected by pytest).

    python tests/benchmarks/bench_training.py [--n 16] [--voxel-size 1.0] [--repeats 1] [--skip-compile] [--only TEXT]

Prints one table of seconds per training image, each row run in a fresh subprocess so that process
settings (the allocator) and caches (torch.compile) do not leak from one row to the next:

- ``reference``: plain eager PyTorch, the same Conv5FC3 forward + cross-entropy + backward + Adam on
  ``--n`` random images already in memory, micro-batches of ``micro_batch_size`` with gradients
  accumulated over ``batch_size`` images as configs/train.yaml does; default allocator, contiguous
  memory, and ClinicaDL's network as it is (ReLU then pooling in every block, odd dimensions copied
  into a zero-padded tensor). Then the same loop with the bundle's pooling (max pooling's own padding,
  :class:`scripts.networks.PadMaxPool3d`), with the bundle's block order (pooling before the ReLU in
  blocks 1-3, ``Conv5FC3(pool_before_relu=3)``), with :func:`scripts.performance.tune_allocator`, with
  channels-last 3D memory, with BatchNorm and pooling fused (``Conv5FC3(fuse_batchnorm_pool=True)``,
  :func:`scripts.networks.batchnorm_maxpool3d`), and with ``torch.compile``: what the hardware allows
  without data loading.
- ``bundle``: ``SupervisedTrainer`` of configs/train.yaml as it is (CacheDataset of ``--n`` demo
  images from :mod:`scripts.demo`, synthetic motion in the DataLoader workers, ``num_workers`` and
  micro-batches of the config); validation is switched off (``val_interval`` beyond the last epoch):
  the rows time training epochs only. Then the same with plain-tensor batches (:data:`PLAIN_TENSORS`),
  with the overrides of :data:`FAST_PATH` (plain tensors, channels-last, allocator), with persistent
  DataLoader workers (:data:`PERSISTENT_WORKERS`) and with ``train#trainer#compile``; and as it is with
  one DataLoader worker, or none (motion made in the training process between steps): the thread
  layout on a machine whose cores the workers share with the training threads.

Every row runs one warm-up epoch (first-call costs: oneDNN kernel selection, torch.compile, worker
start) and then ``--repeats`` timed epochs; ``s/image`` is the median timed epoch divided by the
number of images, ``ratio`` divides it by the eager reference's. Each bundle row without compile
then runs one more epoch under ``torch.profiler`` and the second table splits it into phases of the
step, from ranges opened and closed on the engine's events (main process only):
data wait (the DataLoader: motion and normalisation in the workers), forward (with prepare_batch and
zero_grad), loss, backward, optimiser (torch's ``Optimizer.step`` range) and the rest (metrics,
postprocessing, handlers, profiler overhead), followed by the operators with most self CPU time.

Threads: torch's default (all cores of the machine), or ``--threads``. Inputs are written under
``--work`` (default a temporary folder) and reused when that folder is given again.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]

_PREPARE_BATCH = {"_target_": "scripts.performance.ChannelsLastPrepareBatch", "as_tensor": True}
#: batches reach the network as plain tensors, not MetaTensors (MONAI's metadata handling on every op of the step)
PLAIN_TENSORS: dict[str, Any] = {
    "train#trainer#prepare_batch": {**_PREPARE_BATCH, "enable": False},
    "validate#evaluator#prepare_batch": {**_PREPARE_BATCH, "enable": False},
}
#: overrides that put configs/train.yaml on the CPU fast path (docs/performance.md): plain tensors,
#: channels-last 3D network and batches, allocator tuning
FAST_PATH: dict[str, Any] = {
    "channels_last": True,
    "tune_allocator": True,
    "network": {
        "_target_": "scripts.performance.channels_last",
        "module": "$@network_def.to(@device)",
        "enable": "@channels_last",
    },
    "train#trainer#prepare_batch": {**_PREPARE_BATCH, "enable": "@channels_last"},
    "validate#evaluator#prepare_batch": {**_PREPARE_BATCH, "enable": "@channels_last"},
    "initialize": [
        "$monai.utils.set_determinism(seed=@seed)",
        {"_target_": "scripts.performance.tune_allocator", "enable": "@tune_allocator"},
    ],
}
#: DataLoader workers kept across epochs (configs/train.yaml starts new ones every epoch)
PERSISTENT_WORKERS: dict[str, Any] = {"train#dataloader#persistent_workers": "$@num_workers > 0"}
#: MONAI's SupervisedTrainer compiles the network with torch.compile (needs the plain tensors of FAST_PATH)
COMPILE: dict[str, Any] = {"train#trainer#compile": True}
#: the fallback: BatchNorm and pooling of Conv5FC3's blocks 1-3 as two modules (train.yaml fuses them)
UNFUSED: dict[str, Any] = {"fuse_batchnorm_pool": False}

ROWS: list[tuple[str, str, dict[str, Any]]] = [
    ("reference: eager PyTorch", "reference", {"zero_pad": True, "relu_first": True}),
    ("reference + pooling padding", "reference", {"relu_first": True}),
    ("reference + pooling padding + pooling before ReLU", "reference", {}),
    ("reference + allocator", "reference", {"allocator": True}),
    ("reference + allocator + channels-last", "reference", {"allocator": True, "channels_last": True}),
    (
        "reference + allocator + channels-last + fused BatchNorm/pooling",
        "reference",
        {"allocator": True, "channels_last": True, "fused": True},
    ),
    (
        "reference + allocator + channels-last + compile",
        "reference",
        {"allocator": True, "channels_last": True, "compile": True},
    ),
    ("bundle: train.yaml", "bundle", {"profile": True}),
    ("bundle, BatchNorm/pooling not fused", "bundle", {"unfused": True, "profile": True}),
    ("bundle, 1 DataLoader worker", "bundle", {"workers": 1, "profile": True}),
    ("bundle, motion in the main process (0 workers)", "bundle", {"workers": 0, "profile": True}),
    ("bundle + plain tensors", "bundle", {"plain_tensors": True, "profile": True}),
    ("bundle + fast path", "bundle", {"fast": True, "profile": True}),
    ("bundle + fast path + persistent workers", "bundle", {"fast": True, "persistent": True, "profile": True}),
    (
        "bundle + fast path + persistent workers + compile",
        "bundle",
        {"fast": True, "persistent": True, "compile": True},
    ),
]
PHASES = ("data wait", "forward", "loss", "backward", "optimiser", "rest")


def _train_config() -> dict[str, Any]:
    """micro_batch_size, batch_size and num_workers of configs/train.yaml."""
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(str(ROOT / "configs" / "train.yaml"))
    return {k: parser.get_parsed_content(k) for k in ("micro_batch_size", "batch_size", "num_workers")}


def _prepare(work: Path, n: int, voxel_size: float) -> Path:
    """``n`` demo images (one per participant) at ``voxel_size``; a datalist with all of them for training."""
    from scripts.datalist import load_datalist, write_json_atomic
    from scripts.demo import make_research_demo

    demo = work / f"demo_{n}_{voxel_size:g}mm"
    if not (demo / "datalist.json").is_file():
        make_research_demo(demo, n_participants=n, seed=0, voxel_size=voxel_size, two_session_fraction=0.0)
    items = [it for key in ("training", "validation", "test") for it in load_datalist(demo / "datalist.json", key)]
    if len(items) != n:
        raise RuntimeError(f"{demo} holds {len(items)} images, expected {n}; remove the folder to regenerate it.")
    # validation never runs (val_interval beyond the last epoch), but its dataset is built: one image
    return write_json_atomic({"training": items, "validation": items[:1]}, work / f"datalist_{n}_{voxel_size:g}mm.json")


def _reference(args: argparse.Namespace, opts: dict[str, bool]) -> dict[str, Any]:
    """Plain PyTorch training loop over random in-memory images; per-epoch seconds."""
    import torch

    from scripts import performance
    from scripts.demo import t1_linear_grid
    from scripts.networks import Conv5FC3, PadMaxPool3d
    from scripts.performance import CHANNELS_LAST, channels_last, tune_allocator

    tune_allocator(bool(opts.get("allocator")))
    cfg = _train_config()
    micro, accumulation = cfg["micro_batch_size"], max(1, cfg["batch_size"] // cfg["micro_batch_size"])
    shape, _ = t1_linear_grid(args.voxel_size)
    torch.manual_seed(0)
    images = [torch.randn(min(micro, args.n - i), 1, *shape) for i in range(0, args.n, micro)]
    labels = [torch.randint(0, 2, (len(x),)) for x in images]
    # ClinicaDL's block order (ReLU, then pooling) or the bundle's (pooling first in blocks 1-3: same numbers)
    network = Conv5FC3(
        input_size=shape,
        pool_before_relu=0 if opts.get("relu_first") else 3,
        fuse_batchnorm_pool=bool(opts.get("fused")),
    )
    for module in network.convolutions:  # ClinicaDL's pooling: odd dimensions copied into a zero-padded tensor
        if isinstance(module, PadMaxPool3d):
            module.explicit_pad = bool(opts.get("zero_pad"))
    network = channels_last(network, bool(opts.get("channels_last")))
    optimizer = torch.optim.Adam(network.parameters(), lr=1e-4, weight_decay=1e-4)
    model = torch.compile(network) if opts.get("compile") else network
    memory_format = CHANNELS_LAST if opts.get("channels_last") else torch.contiguous_format
    network.train()
    epochs = []
    for _ in range(1 + args.repeats):
        start = time.perf_counter()
        for i, (x, y) in enumerate(zip(images, labels)):
            if i % accumulation == 0:
                optimizer.zero_grad(set_to_none=True)
            loss = torch.nn.functional.cross_entropy(model(x.contiguous(memory_format=memory_format)), y)
            (loss / accumulation).backward()
            if (i + 1) % accumulation == 0 or i + 1 == len(images):
                optimizer.step()
        epochs.append(time.perf_counter() - start)
    return {"warmup": epochs[0], "epochs": epochs[1:], "images": args.n, "allocator": performance._tuned}


class _Phases:
    """torch.profiler ranges opened and closed on the trainer's events, for one profiled epoch."""

    def __init__(self) -> None:
        self.open: dict[str, Any] = {}

    def start(self, name: str) -> None:
        import torch

        self.stop(name)
        self.open[name] = torch.profiler.record_function(name)
        self.open[name].__enter__()

    def stop(self, name: str) -> None:
        ctx = self.open.pop(name, None)
        if ctx is not None:
            ctx.__exit__(None, None, None)

    def attach(self, trainer: Any) -> None:
        from ignite.engine import Events
        from monai.engines.utils import IterationEvents

        for event, stop, start in (
            (Events.GET_BATCH_STARTED, None, "data wait"),
            (Events.GET_BATCH_COMPLETED, "data wait", None),
            (Events.ITERATION_STARTED, None, "forward"),
            (IterationEvents.FORWARD_COMPLETED, "forward", "loss"),
            (IterationEvents.LOSS_COMPLETED, "loss", "backward"),
            (IterationEvents.BACKWARD_COMPLETED, "backward", None),
        ):
            trainer.add_event_handler(event, self._switch, stop, start)

    def _switch(self, engine: Any, stop: str | None, start: str | None) -> None:
        if stop:
            self.stop(stop)
        if start:
            self.start(start)


def _bundle(args: argparse.Namespace, opts: dict[str, Any]) -> dict[str, Any]:
    """configs/train.yaml's trainer (+ overrides) on the demo datalist; per-epoch seconds and a profile."""
    import torch
    from ignite.engine import Events
    from monai.bundle import ConfigParser

    from scripts import performance
    from scripts.demo import t1_linear_grid

    shape, _ = t1_linear_grid(args.voxel_size)
    profile = bool(opts.get("profile"))
    epochs_total = 1 + args.repeats + int(profile)
    parser = ConfigParser()
    parser.read_config(str(ROOT / "configs" / "train.yaml"))
    parser.update(
        {
            "bundle_root": args.out,
            "datalist": args.datalist,
            "spatial_size": list(shape),
            "val_interval": epochs_total + 1,
            "train#trainer#max_epochs": epochs_total,
        }
    )
    for overrides, on in (
        (PLAIN_TENSORS, opts.get("plain_tensors")),
        (FAST_PATH, opts.get("fast")),
        (PERSISTENT_WORKERS, opts.get("persistent")),
        (COMPILE, opts.get("compile")),
        (UNFUSED, opts.get("unfused")),
    ):
        if on:
            parser.update(overrides)
    if "workers" in opts:  # the thread layout: motion workers beside the training threads on the same cores
        parser.update({"num_workers": int(opts["workers"])})
    parser.get_parsed_content("initialize")
    trainer = parser.get_parsed_content("train#trainer")
    n = len(trainer.data_loader.dataset)
    epochs: list[float] = []
    state: dict[str, Any] = {}
    phases = _Phases()

    def epoch_started(engine: Any) -> None:
        if profile and engine.state.epoch == epochs_total:
            state["prof"] = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU])
            state["prof"].start()
        state["t0"] = time.perf_counter()

    def epoch_completed(engine: Any) -> None:
        seconds = time.perf_counter() - state["t0"]
        if "prof" in state and engine.state.epoch == epochs_total:
            state["prof"].stop()
            state["profiled"] = seconds
        else:
            epochs.append(seconds)

    trainer.add_event_handler(Events.EPOCH_STARTED, epoch_started)
    if profile:
        phases.attach(trainer)
    trainer.add_event_handler(Events.EPOCH_COMPLETED, epoch_completed)
    trainer.run()
    result: dict[str, Any] = {"warmup": epochs[0], "epochs": epochs[1:], "images": n, "allocator": performance._tuned}
    if "prof" in state:
        averages = state["prof"].key_averages()
        seconds = dict.fromkeys(PHASES, 0.0)
        for event in averages:
            if event.key in seconds:
                seconds[event.key] += event.cpu_time_total / 1e6
            elif event.key.startswith("Optimizer.step#"):
                seconds["optimiser"] += event.cpu_time_total / 1e6
        seconds["rest"] = max(0.0, state["profiled"] - sum(seconds.values()))
        skip = ("Optimizer.", "ProfilerStep", "enumerate(DataLoader)")  # ranges: counted in the phases
        ops = [e for e in averages if e.key not in seconds and not e.key.startswith(skip)]
        ops.sort(key=lambda e: e.self_cpu_time_total, reverse=True)
        result["profile"] = {
            "epoch": state["profiled"],
            "phases": seconds,
            "ops": [(e.key, e.self_cpu_time_total / 1e6) for e in ops[: args.top_ops]],
        }
    return result


def _one(args: argparse.Namespace) -> None:
    """Run one row in this process and print its result as a JSON line."""
    sys.path.insert(0, str(ROOT))
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    opts = json.loads(args.opts)
    result = _reference(args, opts) if args.kind == "reference" else _bundle(args, opts)
    print(json.dumps(result))


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=16, help="training images per epoch (default 16)")
    ap.add_argument(
        "--voxel-size",
        type=float,
        default=1.0,
        help="t1-linear box sampled every this many mm: 1 (169x208x179, default) or 4 (43x52x45, a smoke test)",
    )
    ap.add_argument("--repeats", type=int, default=1, help="timed epochs per row after the warm-up epoch (default 1)")
    ap.add_argument("--skip-compile", action="store_true", help="leave out the torch.compile rows")
    ap.add_argument(
        "--only",
        action="append",
        default=[],
        metavar="TEXT",
        help="run only the rows whose name contains TEXT (repeatable; ratios need the first row)",
    )
    ap.add_argument("--threads", type=int, default=0, help="torch threads of the training process (default: torch's)")
    ap.add_argument("--top-ops", type=int, default=6, help="operators listed per profiled row")
    ap.add_argument("--work", default=None, help="folder for the demo images (default: a temporary one)")
    ap.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    for name in ("kind", "opts", "datalist", "out"):
        ap.add_argument(f"--{name}", default="", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        _one(args)
        return
    if args.n < 1 or args.repeats < 1:
        ap.error("--n and --repeats must be at least 1")
    sys.path.insert(0, str(ROOT))
    import torch

    from scripts.demo import t1_linear_grid

    if args.threads:
        torch.set_num_threads(args.threads)
    work = Path(args.work or tempfile.mkdtemp(prefix="bench_training_")).resolve()  # the rows run elsewhere
    work.mkdir(parents=True, exist_ok=True)
    shape, _ = t1_linear_grid(args.voxel_size)
    cfg = _train_config()
    datalist = _prepare(work, args.n, args.voxel_size)
    print(
        f"CPU: {_cpu_name()} ({torch.backends.cpu.get_cpu_capability()}), {os.cpu_count()} cores, "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads; "
        f"images 1x{'x'.join(map(str, shape))} ({args.voxel_size:g} mm), "
        f"{args.n} per epoch, micro-batch {cfg['micro_batch_size']}, batch {cfg['batch_size']}, "
        f"num_workers {cfg['num_workers']}; 1 warm-up + {args.repeats} timed epoch(s) per row; inputs in {work}"
    )
    print(f"{'row':52s} {'s/image':>8s} {'ratio':>6s} {'warm-up s':>9s} {'allocator':>9s}")
    reference: float | None = None
    profiles: list[tuple[str, dict[str, Any]]] = []
    for i, (label, kind, opts) in enumerate(ROWS):
        if (args.skip_compile and opts.get("compile")) or (args.only and not any(t in label for t in args.only)):
            continue
        flags = {"--kind": kind, "--opts": json.dumps(opts), "--n": args.n, "--voxel-size": args.voxel_size,
                 "--repeats": args.repeats, "--threads": args.threads, "--top-ops": args.top_ops,
                 "--datalist": datalist, "--out": work / f"row{i}"}  # fmt: skip
        cmd = [sys.executable, __file__, "--one", *(str(x) for item in flags.items() for x in item)]
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
        if proc.returncode != 0:
            print(f"{label:52s} failed: {proc.stderr.strip()[-800:]}")
            continue
        r = json.loads(proc.stdout.strip().splitlines()[-1])
        per_image = statistics.median(r["epochs"]) / r["images"]
        if i == 0:
            reference = per_image
        ratio = f"{per_image / reference:6.2f}" if reference else f"{'-':>6s}"
        allocator = "on" if r["allocator"] else "off"
        print(f"{label:52s} {per_image:8.3f} {ratio} {r['warmup']:9.1f} {allocator:>9s}")
        if "profile" in r:
            profiles.append((label, r["profile"]))
    if profiles:
        print("\ntorch.profiler, one more epoch of each bundle row (main process): s/image (share of the epoch)")
        names = [label.split("bundle", 1)[-1].lstrip(": ") for label, _ in profiles]  # "train.yaml", "+ fast path", ...
        print(f"{'phase':12s} " + " ".join(f"{name[:34]:>34s}" for name in names))
        for phase in PHASES:
            cells = [
                f"{p['phases'][phase] / args.n:8.3f} ({100 * p['phases'][phase] / p['epoch']:4.1f}%)"
                for _, p in profiles
            ]
            print(f"{phase:12s} " + " ".join(f"{c:>34s}" for c in cells))
        for label, p in profiles:
            print(f"\n{label}: operators by self CPU time, s/image")
            for name, seconds in p["ops"]:
                print(f"  {name[:60]:60s} {seconds / args.n:8.3f}")


if __name__ == "__main__":
    main()
