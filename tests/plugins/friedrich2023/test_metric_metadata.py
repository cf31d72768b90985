"""Every scalar the fsc, column_fit and crlb quantifiers put in a table (or aggregates.parquet) is declared by
the quantifier itself (unit, direction, headline/diagnostic), so the report shows no "no metadata" badge."""

from __future__ import annotations

import numpy as np
import pytest
from test_wiring import ColumnLattice, GaussianADF

from tembench.builtin.noise import PoissonDose
from tembench.builtin.quantifiers_fsc import FourierShellCorrelation
from tembench.metrics import MetricCatalog, declared_metrics
from tembench.types import Reconstruction
from tembench_friedrich2023.quantify import ColumnFit, ColumnFitScore, CRLBPrecision


def _own_catalog(cls) -> MetricCatalog:
    return MetricCatalog((cls.name, k, m) for k, m in declared_metrics(cls).items())


def _scalars(d: dict) -> list[str]:
    return [k for k, v in d.items() if np.ndim(v) == 0]


@pytest.fixture(scope="module")
def scored():
    sample = ColumnLattice().build(ColumnLattice.Params(), None)
    clean = GaussianADF().simulate(sample, GaussianADF.Params(), np)
    noisy = PoissonDose().apply(clean, PoissonDose.Params(dose_e_per_A2=2.0e4), np.random.default_rng(0))
    rec = ColumnFit().reconstruct(noisy, ColumnFit.Params(), np)
    out = {}
    out[ColumnFitScore] = ColumnFitScore().score(rec, noisy, sample, ColumnFitScore.Params(
        border_A=0.5, counting="both", library=[[1, 0.00509], [10, 0.0509]]))
    p = CRLBPrecision.Params(border_A=0.5)
    one = CRLBPrecision().score(rec, noisy, sample, p)
    out[CRLBPrecision] = {**one, **CRLBPrecision().aggregate([one, one, one], sample, p)}
    img = Reconstruction(kind="image", data=np.asarray(rec.data, np.float32), sampling_A=rec.sampling_A,
                         origin_A=(0.0, 0.0), quantity="intensity")
    halves = [img, Reconstruction(kind="image", data=np.asarray(noisy.data, np.float32), sampling_A=rec.sampling_A,
                                  origin_A=(0.0, 0.0), quantity="intensity")]
    img_h = Reconstruction(kind="image", data=img.data, sampling_A=img.sampling_A, origin_A=img.origin_A,
                           quantity="intensity", extras={"half_sets": halves})
    out[FourierShellCorrelation] = FourierShellCorrelation().score(img_h, noisy, sample,
                                                                   FourierShellCorrelation.Params())
    return out


@pytest.mark.parametrize("cls", [FourierShellCorrelation, ColumnFitScore, CRLBPrecision], ids=lambda c: c.name)
def test_every_scalar_metric_is_declared_by_its_quantifier(scored, cls):
    cat = _own_catalog(cls)
    keys = _scalars(scored[cls])
    assert len(keys) >= 8
    missing = [k for k in keys if cat.lookup(k) is None]
    assert not missing, f"{cls.name}: undeclared {missing}"
    heads = [k for k in keys if cat.lookup(k).headline]
    assert heads, f"{cls.name} declares no headline metric"
    for k in heads:
        assert cat.lookup(k).direction in ("higher", "lower") and cat.lookup(k).unit is not None
