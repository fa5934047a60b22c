"""MONAI Label inference task that runs the bundle as a classifier.

MONAI Label's stock ``monaibundle`` app cannot serve this bundle: it appends a ``Restored`` transform
that tries to resize the (2,) probability vector to the image grid and crashes, and it guesses the
task type from the folder name. This task is MONAI Label's own ``BundleInferTask`` with
``type=CLASSIFICATION`` and ``add_post_restore=False`` (what MONAI Label's endoscopy and pathology
classifiers do), plus:

* the weights are checked against the bundle's ``large_files.yml`` before they are loaded
  (``scripts/integrity.py`` of the bundle); a mismatch is refused with a clear error;
* ``spatial_size`` can be overridden from the app config (``--conf spatial_size 43,52,45``) for
  bundles trained at a reduced size;
* the JSON result adds ``probabilities`` (class name -> probability), ``motion_probability`` and
  ``bundle_version`` beside MONAI Label's ``prediction`` list.
"""

from __future__ import annotations

import importlib.util
import logging
import sys
import types
from pathlib import Path
from typing import Any

from monailabel.interfaces.tasks.infer_v2 import InferType

logger = logging.getLogger(__name__)


def _import_bundle_infer_task() -> type:
    """Import ``BundleInferTask`` even where torchvision is not installed.

    monailabel 0.8.5 imports ``torchvision.utils.make_grid/save_image`` at module level in
    ``monailabel.transform.post`` (for image-grid debugging helpers this task never uses). When
    torchvision is missing, a placeholder is registered for the duration of that import only; the two
    helpers then raise if called. With torchvision installed nothing is replaced.
    """
    try:
        import torchvision.utils  # noqa: F401
    except ImportError:

        def unavailable(*args: Any, **kwargs: Any) -> None:
            raise RuntimeError("torchvision is not installed; monailabel's image-grid helpers are unavailable.")

        placeholder, utils = types.ModuleType("torchvision"), types.ModuleType("torchvision.utils")
        utils.make_grid = utils.save_image = unavailable
        placeholder.utils = utils
        sys.modules.update({"torchvision": placeholder, "torchvision.utils": utils})
        try:
            from monailabel.tasks.infer.bundle import BundleInferTask
        finally:
            for name, module in (("torchvision", placeholder), ("torchvision.utils", utils)):
                if sys.modules.get(name) is module:
                    del sys.modules[name]
        return BundleInferTask
    from monailabel.tasks.infer.bundle import BundleInferTask

    return BundleInferTask


BundleInferTask = _import_bundle_infer_task()


def _bundle_integrity(bundle_path: str) -> types.ModuleType:
    """The bundle's ``scripts/integrity.py``, loaded by file path (MONAI Label keeps unloading ``scripts``)."""
    path = Path(bundle_path) / "scripts" / "integrity.py"
    spec = importlib.util.spec_from_file_location("_motion_bundle_integrity", path)
    if spec is None or spec.loader is None:
        raise ImportError(f"Cannot load {path}: is {bundle_path} the brain_t1w_motion_classification bundle?")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class MotionClassificationInfer(BundleInferTask):
    """Per-scan motion probabilities from the bundle at ``path``.

    Args:
        path: bundle root (holds ``configs/inference.yaml``, ``configs/metadata.json``, ``models/model.pt``).
        conf: the app's ``--conf`` values; ``spatial_size`` ("X,Y,Z") overrides the bundle's input size,
            ``preload`` ("true"/"false") loads the network at start-up.
    """

    def __init__(self, path: str, conf: dict[str, str], **kwargs: Any) -> None:
        self._spatial_size = conf.get("spatial_size")
        self._integrity = _bundle_integrity(path)
        super().__init__(path, conf, type=InferType.CLASSIFICATION, add_post_restore=False, **kwargs)
        if not self.is_valid():
            raise ValueError(f"{path} is not a usable bundle: it needs configs/inference.yaml and models/model.pt.")

    def _load_bundle_config(self, path: str, config: str):
        parser = super()._load_bundle_config(path, config)
        if self._spatial_size:
            size = [int(s) for s in str(self._spatial_size).replace("x", ",").split(",") if s.strip()]
            if len(size) != 3:
                raise ValueError(
                    f"spatial_size must be three integers such as 169,208,179, got {self._spatial_size!r}."
                )
            parser["spatial_size"] = size
        return parser

    def _get_network(self, device: Any, data: Any):
        path = self.get_path()
        if path:
            self._integrity.verify_file(path, self.bundle_path)  # raises WeightIntegrityError on mismatch
        return super()._get_network(device, data)

    def writer(self, data: dict[str, Any], extension: Any = None, dtype: Any = None) -> tuple[Any, dict[str, Any]]:
        label, result = super().writer(data, extension, dtype)
        result = dict(result or {})
        probabilities = {p["label"]: float(p["score"]) for p in result.get("prediction", [])}
        result["probabilities"] = probabilities
        if "motion" in probabilities:
            result["motion_probability"] = probabilities["motion"]
        result["bundle_version"] = self.version
        return label, result
