"""The frame shared by You 2025 joint linear tomography and end-to-end ptycho-tomography."""

import numpy as np
import pytest

from tembench.errors import TembenchError
from tembench.physics import rotation as R
from tembench.types import Geometry
from tembench_you2025 import tomo_common as T


def test_shift_image_moves_content_and_is_unitary():
    img = np.zeros((32, 40), np.float32)
    img[10, 12] = 1.0
    out = T.shift_image(img, (2.0, -3.0), 0.5)  # 4 px down, 6 px left
    assert np.unravel_index(np.argmax(out), out.shape) == (14, 6)
    rng = np.random.default_rng(0)
    a = rng.standard_normal((16, 18)) + 1j * rng.standard_normal((16, 18))
    b = rng.standard_normal((16, 18)) + 1j * rng.standard_normal((16, 18))
    lhs = np.vdot(T.shift_image(a.astype(np.complex64), (0.37, -1.1), 0.3), b)
    rhs = np.vdot(a, T.shift_image(b.astype(np.complex64), (-0.37, 1.1), 0.3))
    assert lhs == pytest.approx(rhs, rel=1e-5)


def test_grid_is_centred_on_the_rotation_centre_and_resampling_aligns_images():
    g = T.tomo_grid((20, 24), 0.5, (7.0, 6.0, 8.0))
    assert g.shape == (24, 20, 24)
    np.testing.assert_allclose(g.centre_A, (7.0, 6.0, 8.0))
    img = np.zeros((20, 24), np.float32)
    img[5, 7] = 1.0                      # at (y, x) = origin + (2.5, 3.5) Å
    origin = (g.origin_A[1] + 1.0, g.origin_A[2] - 0.5)
    out = T.resample_to_grid(img, origin, g)
    assert np.unravel_index(np.argmax(out), out.shape) == (7, 6)


def test_slabs_adjoint_dot_product_and_projection_is_the_sum():
    rng = np.random.default_rng(1)
    v = rng.standard_normal((12, 10, 12)).astype(np.float32)
    e = (3.0, 20.0, -2.0)
    g = rng.standard_normal((3, 10, 12)).astype(np.float32)
    lhs = np.vdot(T.slabs(v, e, 4, 0.4).astype(np.float64), g)
    rhs = np.vdot(v.astype(np.float64), T.slabs_adjoint(g, e, 4, 0.4, 12))
    assert lhs == pytest.approx(rhs, rel=1e-5)
    proj = T.slabs(v, (0, 0, 0), 12, 0.4)
    np.testing.assert_allclose(proj[0], 0.4 * v.sum(axis=0), rtol=1e-5, atol=1e-5)
    # complex volumes (e2e) turn real and imaginary parts alike
    c = (v + 1j * rng.standard_normal(v.shape)).astype(np.complex64)
    np.testing.assert_allclose(T.slabs(c, e, 4, 0.4).imag, T.slabs(c.imag.copy(), e, 4, 0.4), atol=1e-5)


def test_nominal_euler_angles_reproduce_the_axis_rotations():
    g = Geometry(tilt_angles_deg=[-30.0, 0.0, 45.0], tilt_axis="y")
    e = T.nominal_euler_deg(g)
    np.testing.assert_allclose(R.euler_matrix(*e[2]), R.axis_rotation_matrix(45.0, "y"), atol=1e-12)
    ex = T.nominal_euler_deg(Geometry(tilt_angles_deg=[25.0], tilt_axis="x"))
    np.testing.assert_allclose(R.euler_matrix(*ex[0]), R.axis_rotation_matrix(25.0, "x"), atol=1e-12)
    with pytest.raises(TembenchError, match="tilt_angles_deg"):
        T.nominal_euler_deg(Geometry())
