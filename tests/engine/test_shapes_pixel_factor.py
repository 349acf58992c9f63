"""benchmarks/shapes_pixel_factor.py: the local defect is 1 - cos^2 of an angle between distance
vectors, so the factor defect of an exact pixel isometry equals the factor-vs-pixel defect, and
the triangle inequality of angles bounds it from below. Checked on float64 random groups."""

import math

import pytest
import torch

from benchmark_scripts import load_benchmark


@pytest.fixture(scope="module")
def pf():
    return load_benchmark("shapes_pixel_factor")


def _defect64(a, b, g):
    """1 - S_ab^2 / (S_aa S_bb) over within-group distances, written out in float64."""
    a = a.reshape(-1, g, a.shape[-1]).double()
    b = b.reshape(-1, g, b.shape[-1]).double()
    da, db = torch.cdist(a, a), torch.cdist(b, b)
    return float(1 - (da * db).sum() ** 2 / ((da * da).sum() * (db * db).sum()))


def test_defect_matches_the_written_out_formula(pf):
    gen = torch.Generator().manual_seed(11)
    a, b = torch.randn(7 * 5, 13, generator=gen), torch.randn(7 * 5, 3, generator=gen)
    assert pf.defect(a, b, 5) == pytest.approx(_defect64(a, b, 5), rel=1e-10, abs=1e-12)


def test_an_exact_pixel_isometry_has_the_factor_vs_pixel_defect(pf):
    gen = torch.Generator().manual_seed(3)
    g = 4
    z = torch.randn(37 * g, 6, dtype=torch.float64, generator=gen)
    x = torch.cat([2.5 * z, torch.zeros(len(z), 4, dtype=torch.float64)], 1)  # distances 2.5 x z's
    f = torch.tanh(x[:, :3]) + 0.1 * torch.randn(len(z), 3, dtype=torch.float64, generator=gen)
    d_xz, d_fx, d_fz = pf.defect(x, z, g), pf.defect(f, x, g), pf.defect(f, z, g)
    # the reference loss forms distances from squared norms, so equal maps agree to ~1e-8, not 1e-15
    assert d_xz == pytest.approx(0, abs=1e-9)
    assert d_fz == pytest.approx(d_fx, rel=1e-6)
    assert pf.lower_bound(d_fx, d_xz) == pytest.approx(d_fz, rel=1e-3)  # d_xz ~1e-9 is an angle of ~3e-5


def test_lower_bound_holds_and_is_reached_on_a_plane(pf):
    gen = torch.Generator().manual_seed(5)
    g = 3
    for trial in range(20):
        z = torch.randn(29 * g, 5, dtype=torch.float64, generator=gen)
        x = z @ torch.randn(5, 8, dtype=torch.float64, generator=gen) + 0.3 * torch.randn(29 * g, 8, dtype=torch.float64,
                                                                                         generator=gen)
        f = torch.sin(x[:, :4]) + 0.2 * torch.randn(29 * g, 4, dtype=torch.float64, generator=gen)
        d_fx, d_xz, d_fz = pf.defect(f, x, g), pf.defect(x, z, g), pf.defect(f, z, g)
        assert d_fz >= pf.lower_bound(d_fx, d_xz) - 1e-12
    # angles 0.9 and 0.3 rad: the bound is sin^2(0.6), neither 0 nor the larger defect
    assert pf.lower_bound(math.sin(0.9) ** 2, math.sin(0.3) ** 2) == pytest.approx(math.sin(0.6) ** 2, rel=1e-12)
    assert pf.lower_bound(math.sin(0.3) ** 2, math.sin(0.9) ** 2) == 0.0
