"""--dataset shapes: the renderer draws what its factors say, deterministically (issue 25)."""

import math

import pytest
import torch

from gsd import shapes
from gsd.data import DataError, check_shapes_settings, load_dataset


def _one(x=0.5, y=0.5, scale=0.2, rotation=0.0, brightness=1.0, kind=0, res=32):
    f = torch.tensor([[x, y, scale, rotation, brightness]], dtype=torch.float64)
    return shapes.render(f, torch.tensor([kind]), res)[0, 0]


def _moments(img):
    """Coverage-weighted centroid (fractions of the side) and covered area (fraction)."""
    w = (img + 1) / 2
    res = img.shape[0]
    c = (torch.arange(res, dtype=torch.float64) + 0.5) / res
    total = float(w.sum())
    return float((w.sum(0).double() * c).sum() / total), float((w.sum(1).double() * c).sum() / total), total / res ** 2


@pytest.mark.parametrize("kind", [0, 1, 2])
def test_the_shape_sits_where_its_factors_say(kind):
    for x, y in ((0.35, 0.6), (0.62, 0.41)):
        cx, cy, _ = _moments(_one(x=x, y=y, kind=kind))
        assert abs(cx - x) < 0.01 and abs(cy - y) < 0.06  # the triangle's centroid is below its centre


def test_area_grows_with_the_square_of_scale_and_brightness_is_the_grey_level():
    # the square's area (side 2 scale) at full brightness, within the 4 x 4 supersampling's
    # rasterisation error (the perimeter's sub-pixel samples)
    for s in (0.12, 0.18, 0.24):
        assert _moments(_one(scale=s))[2] == pytest.approx((2 * s) ** 2, rel=0.08)
    img = _one(brightness=0.6)
    assert float(img.max()) == pytest.approx(-1 + 2 * 0.6, abs=1e-6) and float(img.min()) == -1.0


def test_rotation_within_its_range_changes_every_kind():
    for kind in (0, 1, 2):
        a, b = _one(rotation=0.0, kind=kind), _one(rotation=math.pi / 4, kind=kind)
        assert float((a - b).abs().max()) > 0.5


def test_the_training_set_is_fixed_and_covers_the_factor_box():
    a = load_dataset("shapes", resolution=8, shapes_kinds=3)
    b = load_dataset("shapes", resolution=8, shapes_kinds=3)
    assert torch.equal(a.data, b.data) and a.data.shape == (shapes.TRAIN_IMAGES, 1, 8, 8)
    assert a.num_classes == 3 and sorted(a.labels.unique().tolist()) == [0, 1, 2]
    unit = shapes.normalise(a.info["factors"])
    assert float(unit.min()) >= 0 and float(unit.max()) <= 1
    assert (unit.mean(0) - 0.5).abs().max() < 0.02  # uniform in the box
    one = load_dataset("shapes", resolution=16, shapes_kinds=1)
    assert one.labels is None and one.num_classes == 0 and one.sample_shape == (1, 16, 16)


@pytest.mark.parametrize("res,kinds,needle", [(4, 3, "--resolution"), (33, 3, "--resolution"),
                                              (16, 0, "--shapes-kinds"), (16, 4, "--shapes-kinds")])
def test_settings_outside_the_renderer_are_refused(res, kinds, needle):
    with pytest.raises(DataError, match=needle):
        check_shapes_settings(res, kinds)
