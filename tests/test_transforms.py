"""Tests of scripts.transforms: image validation and per-item deterministic seeding."""

import pytest
import torch
from monai.data import MetaTensor
from monai.transforms import RandGaussianNoised

from scripts.transforms import DeterministicPerItemd, ValidateImage, ValidateImaged


def _img(shape=(1, 8, 9, 10), name="scan.nii.gz"):
    return MetaTensor(torch.rand(shape), meta={"filename_or_obj": name})


def test_validate_accepts_good_image():
    img = _img()
    assert ValidateImage((8, 9, 10))(img) is img
    assert ValidateImaged("image", None)({"image": img})["image"] is img


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: _img((8, 9, 10)), "expected a 3D image"),
        (lambda: _img((3, 8, 9, 10)), "channel"),
        (lambda: _img((1, 8, 9, 11)), "spatial size"),
        (lambda: MetaTensor(torch.zeros(1, 8, 9, 10), meta={"filename_or_obj": "scan.nii.gz"}), "constant"),
    ],
)
def test_validate_errors_name_the_file(make, message):
    with pytest.raises(ValueError, match=message) as err:
        ValidateImage((8, 9, 10))(make())
    assert "scan.nii.gz" in str(err.value)


def test_validate_nan():
    img = _img()
    img[0, 1, 1, 1] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        ValidateImaged("image", (8, 9, 10))({"image": img})


def test_deterministic_per_item_is_stable_across_calls_and_order():
    noise = RandGaussianNoised("image", prob=1.0, std=1.0)
    wrapper = DeterministicPerItemd(noise, seed=7)
    a, b = {"image": _img(name="a.nii")}, {"image": _img(name="b.nii")}
    first_a = wrapper(dict(a))["image"]
    wrapper(dict(b))
    again_a = wrapper(dict(a))["image"]
    assert torch.equal(first_a, again_a)
    assert not torch.equal(wrapper(dict(b))["image"] - b["image"], first_a - a["image"])
    other_seed = DeterministicPerItemd(RandGaussianNoised("image", prob=1.0, std=1.0), seed=8)(dict(a))["image"]
    assert not torch.equal(other_seed, first_a)
    with pytest.raises(TypeError):
        DeterministicPerItemd(object())


def test_deterministic_per_item_is_thread_safe_and_picklable():
    import pickle
    from concurrent.futures import ThreadPoolExecutor

    wrapper = DeterministicPerItemd(RandGaussianNoised("image", prob=1.0, std=1.0), seed=3)
    items = [{"image": _img(name=f"s{i}.nii")} for i in range(12)]
    serial = [wrapper(dict(it))["image"] for it in items]
    with ThreadPoolExecutor(4) as pool:
        threaded = list(pool.map(lambda it: wrapper(dict(it))["image"], items * 3))
    for i, out in enumerate(threaded):
        assert torch.equal(out, serial[i % 12])
    clone = pickle.loads(pickle.dumps(wrapper))
    assert torch.equal(clone(dict(items[0]))["image"], serial[0])
