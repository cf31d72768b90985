"""A reconstructor's ``seed`` param left null follows the scenario seed and the repeat (issue 12 §4)."""

from __future__ import annotations

from types import SimpleNamespace

from pydantic import Field

from tembench import Params, Reconstructor
from tembench.runner import reconstructor_params


class _Seeded(Reconstructor):
    name = "seeded"

    class Params(Params):
        seed: int | None = Field(None, ge=0)
        other: int = 1


class _Unseeded(Reconstructor):
    name = "unseeded"

    class Params(Params):
        other: int = 1


def _r(params=None, key="a"):
    return SimpleNamespace(params=params or {}, key=key)


def test_null_seed_is_derived_from_scenario_seed_repeat_and_key():
    base = reconstructor_params(_Seeded, _r(), seed=7, repeat=0).seed
    assert isinstance(base, int)
    assert reconstructor_params(_Seeded, _r(), seed=7, repeat=0).seed == base          # deterministic
    assert reconstructor_params(_Seeded, _r(), seed=8, repeat=0).seed != base          # scenario seed
    assert reconstructor_params(_Seeded, _r(), seed=7, repeat=1).seed != base          # repeat
    assert reconstructor_params(_Seeded, _r(key="b"), seed=7, repeat=0).seed != base   # reconstructor key


def test_explicit_seed_and_seedless_reconstructors_are_left_alone():
    assert reconstructor_params(_Seeded, _r({"seed": 3}), seed=7, repeat=5).seed == 3
    p = reconstructor_params(_Unseeded, _r({"other": 2}), seed=7, repeat=5)
    assert p.other == 2 and "seed" not in type(p).model_fields


def test_ren_reconstructor_seed_can_be_derived():
    from tembench.registry import get_registry

    cls = get_registry().get("reconstructor", "ren2020_multislice_aet")
    assert reconstructor_params(cls, _r({"seed": None}, key="ren2020"), seed=2020, repeat=0).seed is not None


def test_ren_tilt_order_follows_the_scenario_seed_and_repeat_by_default():
    """Issue 12 §4: with no seed in the scenario, each repeat visits the tilts in its own order."""
    from tembench.registry import get_registry

    cls = get_registry().get("reconstructor", "ren2020_multislice_aet")
    assert cls.Params().seed is None
    s0 = reconstructor_params(cls, _r(key="ren2020"), seed=2020, repeat=0).seed
    s1 = reconstructor_params(cls, _r(key="ren2020"), seed=2020, repeat=1).seed
    assert None not in (s0, s1) and s0 != s1
