"""MONAI Label app serving the brain_t1w_motion_classification bundle as an image classifier.

Start (from the bundle root; see docs/ecosystem.md)::

    monailabel start_server --app apps/motion_classification --studies <folder of NIfTI scans> \
        --host 127.0.0.1 --port 8000 --conf models brain_t1w_motion_classification

Query::

    curl -X POST "http://127.0.0.1:8000/infer/brain_t1w_motion_classification?image=<image id>&output=json"

Config (``--conf key value``): ``bundle_path`` (default: the bundle this app lives in, two folders
up), ``models`` (the model name served, default ``brain_t1w_motion_classification``),
``spatial_size`` ("X,Y,Z", for bundles trained at a reduced size), ``preload``.
Training through MONAI Label is not offered: train with ``python -m monai.bundle run training``.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any

from lib.infers import MotionClassificationInfer
from monailabel.interfaces.app import MONAILabelApp
from monailabel.interfaces.tasks.infer_v2 import InferTask
from monailabel.interfaces.tasks.train import TrainTask

logger = logging.getLogger(__name__)

BUNDLE_NAME = "brain_t1w_motion_classification"


class MotionClassificationApp(MONAILabelApp):
    """One inference task, named after the bundle, that returns per-class probabilities as JSON."""

    def __init__(self, app_dir: str, studies: str, conf: dict[str, str]) -> None:
        default_bundle = os.path.dirname(os.path.dirname(os.path.realpath(app_dir)))
        self.bundle_path = os.path.realpath(conf.get("bundle_path", default_bundle))
        self.model_name = conf.get("models", BUNDLE_NAME)
        meta_file = os.path.join(self.bundle_path, "configs", "metadata.json")
        if not os.path.isfile(meta_file):
            raise FileNotFoundError(f"{meta_file} not found: pass --conf bundle_path <bundle root>.")
        with open(meta_file) as f:
            meta = json.load(f)
        labels = {v: int(k) for k, v in meta["network_data_format"]["outputs"]["pred"]["channel_def"].items()}
        super().__init__(
            app_dir=app_dir,
            studies=studies,
            conf=conf,
            name=meta.get("name", BUNDLE_NAME),
            description=meta.get("description", ""),
            version=meta.get("version", ""),
            labels=labels,
        )

    def init_infers(self) -> dict[str, InferTask]:
        logger.info("Serving bundle %s as model '%s'", self.bundle_path, self.model_name)
        return {self.model_name: MotionClassificationInfer(self.bundle_path, self.conf)}

    def init_trainers(self) -> dict[str, TrainTask]:
        return {}

    def init_strategies(self) -> dict[str, Any]:
        return {}
