"""AIRPI — AI-assisted rapid phase imaging (Friedrich 2023 ch. 4; Friedrich et al., M&M 29, 395 (2023)).

Per scan position a network sees the 3×3 kernel of adjacent CBEDs (plus the probe) and predicts the
exit wave of the central position; the object patch follows from the phase object approximation
(eq 4.1) and the patches are stitched by complex addition (eqs 4.4–4.8). Needs JAX (the ``nn`` extra).

The network frame. Every pattern is rebinned (area overlap, counts conserved) onto an N×N frame
(N = :data:`N_FRAME` = 32) whose half-width is 2α: the aperture radius is N/4 pixels whatever the
convergence angle, and the frame's real-space patch has pixel p = λ/(4α) (0.25 Å at 300 kV, 20 mrad)
and width N·p. Frequencies are centred (DC at pixel N//2); a wave ψ(k) on the frame is the FFT of a
real-space patch whose probe sits at pixel (N//2, N//2): ``to_real(ψ) = ifft2(ifftshift(ψ))`` (ortho).
Electrons beyond 2α are not used (the thesis's detector also stops at its collection angle).

Inputs (12 channels; 13 for weights with the dose input, v2): the nine CBEDs in probe units (x = counts · n_ap
/ mean counts of the nine, so a noise-free x ≈ |ψ_out(k)|² with |ψ_in| = 1 in the aperture), compressed as x^0.1 and scaled by the
step weights ζ (eq 4.10, :func:`step_weights`), then the probe ψ_in(k): |ψ_in|, cos χ, sin χ, and (v2) the
dose level :func:`dose_level`. v2's weights also carry a learned dose-dependent Gaussian smoothing of each
patch's object before it is stitched (:func:`smooth_patches`, ``smooth/a``, ``smooth/b``).
Outputs: the exit wave ψ_out(k) on the frame as amplitude, sin φ, cos φ, each a skip plus a learnt
residual: the probe's phase (the probe skip connection, Fig. 4.4) and the measured amplitude (see
:func:`forward`). Unlike the authors' code, the wave is predicted
in k-space — on the grid of the input patterns, so a small U-Net with a local receptive field can
learn it here in minutes on a CPU; the loss (eq 4.11) sees it in both spaces.
"""

from __future__ import annotations

import functools
import json
import math
from pathlib import Path

import numpy as np

from typing import Literal

from pydantic import Field

from tembench import Params, Reconstructor
from tembench.errors import TembenchError
from tembench.physics.constants import wavelength_A
from tembench.types import Reconstruction
from tembench_friedrich2023.restore_unet import he_init, n_parameters  # noqa: F401  (n_parameters re-exported)

DATA = Path(__file__).parent / "data"
DEFAULT_WEIGHTS = "airpi_v2"
INSTALL_HINT = 'pip install -e ".[nn]"  (installs jax and optax)'
N_FRAME = 32                  # frame pixels per side
APERTURE_PX = N_FRAME / 4     # aperture radius on the frame (px): the frame spans ±2α
POWER = 0.1                   # dynamic-range compression of the CBEDs (§4.2.4)
ZETA_SCALE = 50.0             # eq 4.10's constant
N_IN, N_OUT = 12, 3
DEFAULT_WIDTHS = (16, 32, 48)
#: the optional dose input (v2): a 13th, constant channel log10 of the kernel's mean counts per pattern (on the
#: frame), clipped to [0, DOSE_NOISE_FREE]; noise-free (non-integer) data get DOSE_NOISE_FREE
DOSE_NOISE_FREE = 6.0
#: the optional learned smoothing (v2 attempt, session 9): each patch's object phasor ω·T_patch is convolved with a
#: Gaussian of σ = exp(a + b·(L − SMOOTH_L0)) frame px before it is stitched, L its kernel's dose level; (a, b) are
#: the weights' ``smooth/a`` and ``smooth/b`` (needs the dose input)
SMOOTH_L0 = 1.3


# --- frame geometry ------------------------------------------------------------------------------
def frame_pixel_A(energy_keV: float, semiangle_mrad: float) -> float:
    """Real-space pixel p (Å) of the frame's patch: λ/(4α) (the frame spans ±2α in k)."""
    if not (semiangle_mrad and semiangle_mrad > 0):
        raise TembenchError(f"airpi needs the probe convergence semiangle (mrad) > 0, got {semiangle_mrad}")
    return wavelength_A(energy_keV) / (4.0 * semiangle_mrad * 1e-3)


def frame_angle_mrad(semiangle_mrad: float) -> float:
    """Angular size (mrad) of one frame pixel: 4α/N."""
    return 4.0 * semiangle_mrad / N_FRAME


def centred_frequencies(p_A: float, n: int = N_FRAME) -> tuple[np.ndarray, np.ndarray]:
    """(ky (n, 1), kx (1, n)) in 1/Å, centred (DC at n//2), of an n-pixel patch with pixel p_A."""
    k = (np.arange(n) - n // 2) / (n * p_A)
    return k[:, None], k[None, :]


def probe_frame(energy_keV: float, semiangle_mrad: float, aberrations: dict | None = None) -> np.ndarray:
    """ψ_in(k) on the frame (N, N) complex64, centred, |ψ_in| = 1 inside the aperture, its real-space
    patch centred on pixel (N//2, N//2) (eq 4.2; the platform's aperture and aberration function)."""
    from tembench.physics.optics import fourier_shift_phase, probe_fourier
    from tembench.physics.grid import spatial_frequencies

    p = frame_pixel_A(energy_keV, semiangle_mrad)
    pk = np.asarray(probe_fourier((N_FRAME, N_FRAME), p, energy_keV, semiangle_mrad, aberrations), np.complex128)
    pk = pk / np.abs(pk).max()
    ky, kx = spatial_frequencies((N_FRAME, N_FRAME), p, dtype=np.float64)
    pk = pk * np.asarray(fourier_shift_phase(ky, kx, (N_FRAME // 2 * p, N_FRAME // 2 * p)))
    return np.fft.fftshift(pk).astype(np.complex64)


def to_real(psi_k, xp=np):
    """Real-space patch of a centred frame wave (ortho FFT: Σ|ψ(r)|² = Σ|ψ(k)|²)."""
    return xp.fft.ifft2(xp.fft.ifftshift(psi_k, axes=(-2, -1)), norm="ortho")


def to_fourier(psi_r, xp=np):
    return xp.fft.fftshift(xp.fft.fft2(psi_r, norm="ortho"), axes=(-2, -1))


def aperture_pixels(probe_k: np.ndarray) -> float:
    """n_ap = Σ|ψ_in(k)|²: the probe's intensity on the frame (≈ π (N/4)² pixels)."""
    return float(np.sum(np.abs(probe_k) ** 2))


def rebin_matrix(n_data: int, centre_px: float, data_pixel_mrad: float, frame_pixel_mrad: float,
                 n_frame: int = N_FRAME) -> np.ndarray:
    """(n_frame, n_data) overlap fractions: frame pixel j ← data pixel i (counts conserved).

    Data pixel i covers angles [(i − c − ½)·d, (i − c + ½)·d]; frame pixel j covers
    [(j − N/2 − ½)·D, (j − N/2 + ½)·D] (frame centre pixel N//2 on the unscattered beam).
    """
    i = np.arange(n_data)
    d_lo, d_hi = (i - centre_px - 0.5) * data_pixel_mrad, (i - centre_px + 0.5) * data_pixel_mrad
    j = np.arange(n_frame)
    f_lo, f_hi = (j - n_frame // 2 - 0.5) * frame_pixel_mrad, (j - n_frame // 2 + 0.5) * frame_pixel_mrad
    overlap = np.clip(np.minimum(f_hi[:, None], d_hi[None, :]) - np.maximum(f_lo[:, None], d_lo[None, :]), 0, None)
    return overlap / data_pixel_mrad


def step_weights(step_A) -> np.ndarray:
    """ζ of the 3×3 kernel (eq 4.10): 1 at the centre, 1/(50·|Δr|) at a neighbour |Δr| Å away.

    For a square grid this is ζ_xy = 1/(50·Δs) and ζ_d = 1/(50·√2·Δs), as the authors' code computes
    it (``fcn_weight_cbeds``: ``(1/sqrt(2·Δs²))/50``); the thesis prints ζ_d = 1/(√2·Δs²·50), a typo
    (not dimensionally consistent with ζ_xy). A non-square step uses the true distances.
    """
    sy, sx = (float(step_A), float(step_A)) if np.ndim(step_A) == 0 else (float(step_A[0]), float(step_A[1]))
    if not (sy > 0 and sx > 0):
        raise TembenchError(f"airpi: scan step must be positive (Å), got {step_A}")
    dy = np.array([-1, 0, 1])[:, None] * sy
    dx = np.array([-1, 0, 1])[None, :] * sx
    d = np.hypot(dy, dx)
    z = np.ones((3, 3))
    z[d > 0] = 1.0 / (ZETA_SCALE * d[d > 0])
    return z


def compress(counts) -> np.ndarray:
    """c^0.1 (float32) of CBEDs on the frame: done once per pattern (x^0.1 = c^0.1 · scale^0.1)."""
    return np.clip(np.asarray(counts, np.float32), 0, None) ** np.float32(POWER)


def dose_level(totals, noise_free: bool = False) -> np.ndarray:
    """The dose input (B,): log10 of the mean counts per pattern of each 3×3 kernel (totals (B, 3, 3) counts on the
    frame), clipped to [0, DOSE_NOISE_FREE]; ``noise_free`` (intensities, not counts) gives DOSE_NOISE_FREE."""
    t = np.asarray(totals, np.float64).reshape(len(totals), 9).mean(axis=1)
    if noise_free:
        return np.full(len(t), DOSE_NOISE_FREE)
    return np.clip(np.log10(np.maximum(t, 1.0)), 0.0, DOSE_NOISE_FREE)


def is_counts(x) -> bool:
    """True when the data are whole numbers (electron counts: the dose input is their level); False for noise-free
    intensities, whose scale says nothing about a dose."""
    a = np.asarray(x)
    return bool(np.all(np.mod(a, 1.0) == 0))


def inputs_from_compressed(ck: np.ndarray, totals: np.ndarray, probe_k: np.ndarray, step_A,
                           dose_input: bool = False, noise_free: bool = False) -> np.ndarray:
    """Network input (B, 12, N, N) from compressed kernels ck (B, 3, 3, N, N) and their counts (B, 3, 3); with
    ``dose_input`` (B, 13, N, N): channel 12 is the constant :func:`dose_level`."""
    b = ck.shape[0]
    scale = aperture_pixels(probe_k) / np.maximum(np.asarray(totals, np.float64).reshape(b, 9).mean(axis=1), 1e-30)
    w = (scale[:, None, None] ** POWER) * step_weights(step_A)[None]
    out = np.empty((b, N_IN + int(dose_input), N_FRAME, N_FRAME), np.float32)
    out[:, :9] = (ck * w[:, :, :, None, None].astype(np.float32)).reshape(b, 9, N_FRAME, N_FRAME)
    ph = np.angle(probe_k)
    amp = np.abs(probe_k)
    out[:, 9] = amp
    out[:, 10] = np.where(amp > 0, np.cos(ph), 1.0)
    out[:, 11] = np.where(amp > 0, np.sin(ph), 0.0)
    if dose_input:
        out[:, 12] = dose_level(totals, noise_free)[:, None, None]
    return out


def network_inputs(kernels: np.ndarray, probe_k: np.ndarray, step_A, dose_input: bool = False,
                   noise_free: bool = False) -> np.ndarray:
    """Network input (B, 12, N, N) float32 from CBED kernels (B, 3, 3, N, N) in counts (or intensities)
    on the frame: x = counts · n_ap / ⟨counts per pattern⟩ of the nine, x^0.1·ζ; then |ψ_in|, cos χ, sin χ;
    with ``dose_input`` the 13th channel, :func:`dose_level` (``noise_free``: intensities, not counts)."""
    k = np.asarray(kernels, np.float32)
    return inputs_from_compressed(compress(k), k.sum(axis=(-2, -1), dtype=np.float64), probe_k, step_A,
                                  dose_input, noise_free)


# --- network (plain JAX: lax convolutions, NCHW) ---------------------------------------------------
def conv_shapes(widths=DEFAULT_WIDTHS, n_in: int = N_IN) -> dict[str, tuple[int, int, int, int]]:
    """Kernel shapes; ``n_in`` = 12, or 13 with the dose input."""
    w0, w1, w2 = widths
    return {
        "e0a": (w0, n_in, 3, 3), "e0b": (w0, w0, 3, 3),
        "d0": (w1, w0, 3, 3), "e1a": (w1, w1, 3, 3), "e1b": (w1, w1, 3, 3),
        "d1": (w2, w1, 3, 3), "ba": (w2, w2, 3, 3), "bb": (w2, w2, 3, 3),
        "u1": (w1, w2, 3, 3), "c1a": (w1, 2 * w1, 3, 3), "c1b": (w1, w1, 3, 3),
        "u0": (w0, w1, 3, 3), "c0a": (w0, 2 * w0, 3, 3), "c0b": (w0, w0, 3, 3),
        "out": (N_OUT, w0, 3, 3),
    }


def init_params(seed: int, widths=DEFAULT_WIDTHS, dose_input: bool = False) -> dict[str, np.ndarray]:
    """He-normal kernels, zero biases; the output conv starts at zero (the net starts as the probe skip)."""
    return he_init(conv_shapes(widths, N_IN + int(dose_input)), seed)


def _conv(jax, x, params, name, stride=1):
    w, b = params[f"{name}/w"], params[f"{name}/b"]
    y = jax.lax.conv_general_dilated(x, w, (stride, stride), "SAME", dimension_numbers=("NCHW", "OIHW", "NCHW"))
    return y + b[None, :, None, None]


def forward(params, x):
    """Compact U-Net (two stride-2 down-samplings, Swish, concatenated skips) + skip connections.

    x (B, 12, N, N) → (amplitude, sin φ, cos φ) of ψ_out(k), each (B, N, N), each a skip plus the network's
    residual: the phase skips are the probe's (sin χ, cos χ; the thesis's probe skip connection), the
    amplitude skip is the measured one, √x of the central CBED (the thesis skips the probe amplitude, too;
    with the measured amplitude the untrained network *is* the probe-only baseline, which is already a
    COM-like phase image, and a CPU-sized training only has to learn the correction).
    """
    import jax
    import jax.numpy as jnp

    act = jax.nn.silu

    def block(h, a, b):
        return act(_conv(jax, act(_conv(jax, h, params, a)), params, b))

    def up(h, name):
        h = jnp.repeat(jnp.repeat(h, 2, axis=2), 2, axis=3)
        return act(_conv(jax, h, params, name))

    e0 = block(x, "e0a", "e0b")
    e1 = block(act(_conv(jax, e0, params, "d0", stride=2)), "e1a", "e1b")
    bt = block(act(_conv(jax, e1, params, "d1", stride=2)), "ba", "bb")
    c1 = block(jnp.concatenate([up(bt, "u1"), e1], axis=1), "c1a", "c1b")
    c0 = block(jnp.concatenate([up(c1, "u0"), e0], axis=1), "c0a", "c0b")
    r = _conv(jax, c0, params, "out")
    amp0 = jnp.clip(x[:, 4], 0.0, None) ** (0.5 / POWER)  # √x of the central CBED: the measured |ψ_out(k)|
    return amp0 + r[:, 0], x[:, 11] + r[:, 1], x[:, 10] + r[:, 2]


def smoothing_sigma(level, a, b, xp=np):
    """σ (frame px) of the learned smoothing for dose levels L (B,): exp(a + b·(L − SMOOTH_L0))."""
    return xp.exp(a + b * (level - SMOOTH_L0))


def smooth_patches(t, sigma_px, xp=np):
    """Patches t (B, N, N) complex, each convolved (circularly) with a Gaussian of σ_b px: × exp(−2π²σ²|f|²)."""
    f = np.fft.fftfreq(t.shape[-1])
    f2 = xp.asarray((f[:, None] ** 2 + f[None, :] ** 2).astype(np.float32))
    h = xp.exp(-2.0 * np.pi ** 2 * xp.asarray(sigma_px)[:, None, None] ** 2 * f2[None])
    return xp.fft.ifft2(xp.fft.fft2(t) * h)


def compose_wave(amp, s, c, xp=np, eps=1e-6):
    """ψ = amp·(cos φ + i sin φ) with (sin, cos) renormalised to the unit circle."""
    n = xp.sqrt(s * s + c * c) + eps
    return amp * (c + 1j * s) / n


def save_weights(path, params, widths) -> None:
    """Kernels + ``widths`` + ``n_in`` (12, or 13 with the dose input; files without it are v1's 12)."""
    n_in = int(np.shape(params["e0a/w"])[1])
    np.savez_compressed(path, widths=np.asarray(widths, np.int64), n_in=np.asarray(n_in, np.int64),
                        **{k: np.asarray(v, np.float32) for k, v in params.items()})


def load_weights_file(path) -> tuple[dict[str, np.ndarray], tuple[int, ...]]:
    with np.load(path, allow_pickle=False) as z:
        widths = tuple(int(v) for v in z["widths"])
        n_in = int(z["n_in"]) if "n_in" in z.files else N_IN
        params = {k: np.asarray(z[k], np.float32) for k in z.files if k not in ("widths", "n_in")}
    if n_in not in (N_IN, N_IN + 1):
        raise TembenchError(f"airpi: weights file {path} has {n_in} input channels (12, or 13 with the dose input)")
    shapes = conv_shapes(widths, n_in)
    missing = {f"{n}/{t}" for n in shapes for t in ("w", "b")} - set(params)
    if missing:
        raise TembenchError(f"airpi: weights file {path} lacks {sorted(missing)}")
    if tuple(params["e0a/w"].shape) != shapes["e0a"]:
        raise TembenchError(f"airpi: weights file {path}: first kernel {params['e0a/w'].shape}, expected {shapes['e0a']}")
    return params, widths


@functools.lru_cache(maxsize=8)
def _weights_info(path: str) -> tuple[int, tuple[float, float] | None]:
    """(input channels, smoothing (a, b) or None) of a weights file, read once per process (as :func:`_network`)."""
    params = load_weights_file(path)[0]
    smooth = (float(params["smooth/a"]), float(params["smooth/b"])) if "smooth/a" in params else None
    return int(params["e0a/w"].shape[1]), smooth


def smoothing_params(weights: str = DEFAULT_WEIGHTS) -> tuple[float, float] | None:
    """(a, b) of the learned smoothing (:func:`smoothing_sigma`), or None for weights without it (v1)."""
    return _weights_info(str(weights_path(weights)))[1]


def has_dose_input(weights: str = DEFAULT_WEIGHTS) -> bool:
    """Whether these weights take the dose input (13 channels)."""
    return _weights_info(str(weights_path(weights)))[0] == N_IN + 1


def weights_path(weights: str) -> Path:
    """A shipped weights name (``airpi_v1``) or a path to an ``.npz`` written by ``airpi_train``."""
    p = Path(weights)
    if p.suffix == ".npz":
        if not p.exists():
            raise TembenchError(f"airpi: weights file {weights!r} does not exist.")
        return p
    shipped = DATA / f"{weights}.npz"
    if not shipped.exists():
        known = sorted(q.stem for q in DATA.glob("airpi_*.npz"))
        raise TembenchError(f"airpi: no shipped weights named {weights!r}; available: {known or '(none)'}, or a "
                            "path to an .npz from `python -m tembench_friedrich2023.airpi_train`.")
    return shipped


def weights_metadata(weights: str = DEFAULT_WEIGHTS) -> dict:
    side = weights_path(weights).with_suffix(".json")
    return json.loads(side.read_text()) if side.exists() else {}


def require_jax(who: str = "airpi"):
    try:
        import jax  # noqa: F401
    except ImportError as exc:
        raise TembenchError(f"{who} needs JAX, which is not installed here. Install the neural-network extra: "
                            f"{INSTALL_HINT}.") from exc


@functools.lru_cache(maxsize=4)
def _network(path: str):
    """(jitted forward, params on device) for a weights file; cached per process."""
    import jax
    import jax.numpy as jnp

    params, _ = load_weights_file(path)
    return jax.jit(forward), {k: jnp.asarray(v) for k, v in params.items()}


def predict_waves(inputs: np.ndarray, weights: str = DEFAULT_WEIGHTS, batch: int = 256) -> np.ndarray:
    """ψ_out(k) (B, N, N) complex64 from network inputs (B, 12, N, N); fixed-size batches (one compile)."""
    require_jax()
    fwd, params = _network(str(weights_path(weights)))
    out = np.empty((len(inputs), N_FRAME, N_FRAME), np.complex64)
    for a in range(0, len(inputs), batch):
        x = inputs[a:a + batch]
        n = len(x)
        if n < batch:  # one shape: one compilation
            x = np.concatenate([x, np.zeros((batch - n, *x.shape[1:]), x.dtype)])
        amp, s, c = (np.asarray(v, np.float64)[:n] for v in fwd(params, x))
        out[a:a + n] = compose_wave(amp, s, c)
    return out


# --- test-time augmentation: the 8 symmetries of the square ----------------------------------------
#: (transpose, negate y, negate x): the dihedral group D4 acting on the scan and detector axes together
SQUARE_SYMMETRIES = tuple((t, ny, nx) for t in (False, True) for ny in (False, True) for nx in (False, True))


def _negate(a, axis: int, centred: bool):
    """a[..., −i, ...]: index i ↦ −i about the centre (a 3-point kernel axis: a flip) or, for a frame with DC
    at n//2 (``centred``, even n), frequency k ↦ −k: index i ↦ n − i (mod n), a flip and a roll by one."""
    a = np.flip(a, axis)
    return np.roll(a, 1, axis) if centred else a


def transform_inputs(inputs: np.ndarray, sym) -> np.ndarray:
    """Network inputs (B, C, N, N) of the specimen under the symmetry ``sym`` = (transpose, negate y, negate x):
    the 3×3 kernel's scan offsets (channels 0–8) and every frame (k_y, k_x) are mapped together — a scan of the
    transformed specimen, provided the detector axes are the scan axes and the step is square."""
    t, ny, nx = sym
    b, c, n, _ = inputs.shape
    k = inputs[:, :9].reshape(b, 3, 3, n, n)
    rest = inputs[:, 9:]
    if t:
        k = k.transpose(0, 2, 1, 4, 3)
        rest = rest.transpose(0, 1, 3, 2)
    if ny:
        k, rest = _negate(_negate(k, 1, False), 3, True), _negate(rest, 2, True)
    if nx:
        k, rest = _negate(_negate(k, 2, False), 4, True), _negate(rest, 3, True)
    return np.ascontiguousarray(np.concatenate([k.reshape(b, 9, n, n), rest], axis=1))


def untransform_waves(psi_k: np.ndarray, sym) -> np.ndarray:
    """ψ(k) (B, N, N) back from the frame of :func:`transform_inputs` (the inverse map)."""
    t, ny, nx = sym
    if nx:
        psi_k = _negate(psi_k, 2, True)
    if ny:
        psi_k = _negate(psi_k, 1, True)
    return psi_k.transpose(0, 2, 1) if t else psi_k


def predict_waves_symmetrised(inputs: np.ndarray, weights: str = DEFAULT_WEIGHTS) -> np.ndarray:
    """The mean of the network's ψ(k) over the 8 symmetries of the square (each input mapped, the output mapped
    back): test-time augmentation, 8× the network work."""
    acc = np.zeros((len(inputs), N_FRAME, N_FRAME), np.complex128)
    for sym in SQUARE_SYMMETRIES:
        acc += untransform_waves(predict_waves(transform_inputs(inputs, sym), weights), sym)
    return (acc / len(SQUARE_SYMMETRIES)).astype(np.complex64)


def probe_only_waves(inputs: np.ndarray) -> np.ndarray:
    """The no-network baseline: amplitude from the measured central CBED (x^0.1 undone), the probe's phase —
    the network's skip connections alone (its output with a zero residual)."""
    x = np.asarray(inputs, np.float64)
    amp = np.clip(x[:, 4], 0, None) ** (0.5 / POWER)
    return (amp * (x[:, 10] + 1j * x[:, 11])).astype(np.complex64)


# --- stitching (eqs 4.4–4.8) -----------------------------------------------------------------------
def patch_weight(psi_in_r: np.ndarray) -> np.ndarray:
    """ω_n (eq 4.7): |ψ_in|²/Σ|ψ_in|² where |ψ_in|² > max/10, else 0."""
    i = np.abs(psi_in_r) ** 2
    return np.where(i > 0.1 * i.max(axis=(-2, -1), keepdims=True), i / i.sum(axis=(-2, -1), keepdims=True), 0.0)


class Stitcher:
    """Object canvas T(r) = Σ_n T_patch,n (eq 4.8) with pixel p; positions in Å relative to the scan origin.

    A patch is placed with its centre on the canvas pixel nearest the probe position; the remaining
    sub-pixel offset enters ψ_in(k) and ψ_out(k) as the phase factor of eq 4.4 before both go to real
    space (eq 4.5). T_patch = (ψ_out/ψ_in)/|ψ_out/ψ_in|·ω_n (eq 4.6), computed as ψ_out·ψ_in*/|…|.
    """

    def __init__(self, extent_A, p_A: float, probe_k: np.ndarray):
        self.p = float(p_A)
        self.margin = N_FRAME // 2 + 1
        ny = int(math.ceil(extent_A[0] / self.p)) + 2 * self.margin + 1
        nx = int(math.ceil(extent_A[1] / self.p)) + 2 * self.margin + 1
        self.T = np.zeros((ny, nx), np.complex128)
        self.W = np.zeros((ny, nx), np.float64)
        self.probe_k = np.asarray(probe_k, np.complex128)
        self.ky, self.kx = centred_frequencies(self.p)

    def add(self, psi_out_k: np.ndarray, positions_A: np.ndarray, sigma_px=None) -> None:
        """Add patches: ψ_out(k) (B, N, N) at probe positions (B, 2) (y, x) Å; ``sigma_px`` (B,): each patch's
        ω·T_patch convolved with a Gaussian of that σ first (the learned smoothing, :func:`smooth_patches`)."""
        u = np.asarray(positions_A, np.float64).reshape(-1, 2) / self.p + self.margin
        whole = np.round(u).astype(np.int64)
        frac = (u - whole) * self.p
        ramp = np.exp(-2j * np.pi * (self.ky[None] * frac[:, 0, None, None] + self.kx[None] * frac[:, 1, None, None]))
        psi_in = to_real(self.probe_k[None] * ramp)
        psi_out = to_real(np.asarray(psi_out_k, np.complex128) * ramp)
        ratio = psi_out * np.conj(psi_in)
        mag = np.abs(ratio)
        w = patch_weight(psi_in)
        t = np.where(mag > 0, ratio / np.where(mag > 0, mag, 1.0), 0.0) * w
        if sigma_px is not None:
            t = smooth_patches(t, np.asarray(sigma_px, np.float64))
        h = N_FRAME // 2
        for n in range(len(t)):
            y0, x0 = whole[n, 0] - h, whole[n, 1] - h
            self.T[y0:y0 + N_FRAME, x0:x0 + N_FRAME] += t[n]
            self.W[y0:y0 + N_FRAME, x0:x0 + N_FRAME] += w[n]

    def phase(self, shape_px) -> tuple[np.ndarray, np.ndarray]:
        """(phase, Σω) on ``shape_px`` canvas pixels from the scan origin; uncovered pixels get phase 0."""
        m = self.margin
        sl = (slice(m, m + shape_px[0]), slice(m, m + shape_px[1]))
        t, w = self.T[sl], self.W[sl]
        return np.where(w > 0, np.angle(t), 0.0), w


def frames_of(x: np.ndarray, grid, semiangle_mrad: float) -> np.ndarray:
    """Rebin 4D data (Sy, Sx, ky, kx) onto the frame (Sy, Sx, N, N) float32 (area overlap, counts kept)."""
    d = frame_angle_mrad(semiangle_mrad)
    ry = rebin_matrix(grid.shape[0], grid.centre_px[0], grid.sampling_mrad[0], d)
    rx = rebin_matrix(grid.shape[1], grid.centre_px[1], grid.sampling_mrad[1], d)
    ry, rxt = ry.astype(np.float32), np.ascontiguousarray(rx.T.astype(np.float32))
    out = np.empty((*x.shape[:2], N_FRAME, N_FRAME), np.float32)
    for i in range(x.shape[0]):
        out[i] = np.matmul(np.matmul(ry, np.asarray(x[i], np.float32)), rxt)
    return out


def kernels_at(frames: np.ndarray, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """3×3 kernels (B, 3, 3, …) of per-position arrays (Sy, Sx, …) around interior positions (rows, cols)."""
    dy = np.array([-1, 0, 1])
    return frames[rows[:, None, None] + dy[None, :, None], cols[:, None, None] + dy[None, None, :]]


def reconstruct_airpi(x: np.ndarray, grid, step_A, energy_keV: float, semiangle_mrad: float,
                      aberrations: dict | None, mode: str = "network", weights: str = DEFAULT_WEIGHTS,
                      chunk: int = 512, symmetrise: bool = False) -> dict:
    """Stitched object phase on the frame pixel p from dense 4D data (Sy, Sx, ky, kx).

    Only interior positions (with all eight neighbours) get a patch. Returns phase (rad, mean over the
    covered area removed), coverage Σω, pixel p (Å) and the number of patches.
    """
    sy, sx = (float(step_A), float(step_A)) if np.ndim(step_A) == 0 else (float(step_A[0]), float(step_A[1]))
    if x.shape[0] < 3 or x.shape[1] < 3:
        raise TembenchError(f"airpi needs at least 3 x 3 scan positions (a 3x3 kernel of CBEDs), got {x.shape[:2]}")
    p = frame_pixel_A(energy_keV, semiangle_mrad)
    extent = ((x.shape[0] - 1) * sy, (x.shape[1] - 1) * sx)
    probe_k = probe_frame(energy_keV, semiangle_mrad, aberrations)
    dose_in = mode != "probe_only" and has_dose_input(weights)
    noise_free = dose_in and not is_counts(x)
    smooth = smoothing_params(weights) if dose_in else None
    frames = frames_of(x, grid, semiangle_mrad)
    totals = frames.sum(axis=(-2, -1), dtype=np.float64)
    ck = compress(frames)
    del frames
    rr, cc = np.meshgrid(np.arange(1, x.shape[0] - 1), np.arange(1, x.shape[1] - 1), indexing="ij")
    rr, cc = rr.ravel(), cc.ravel()
    st = Stitcher(extent, p, probe_k)
    for a in range(0, len(rr), chunk):
        r, c = rr[a:a + chunk], cc[a:a + chunk]
        inp = inputs_from_compressed(kernels_at(ck, r, c), kernels_at(totals, r, c), probe_k, (sy, sx), dose_in,
                                     noise_free)
        psi = (probe_only_waves(inp) if mode == "probe_only" else
               predict_waves_symmetrised(inp, weights) if symmetrise else predict_waves(inp, weights))
        sig = smoothing_sigma(inp[:, N_IN, 0, 0].astype(np.float64), *smooth) if smooth else None
        st.add(psi, np.stack([r * sy, c * sx], axis=1), sig)
    shape = (int(math.floor(extent[0] / p)) + 1, int(math.floor(extent[1] / p)) + 1)
    phase, w = st.phase(shape)
    cov = w > 0
    if cov.any():
        phase = np.where(cov, phase - phase[cov].mean(), 0.0)
    return {"phase": phase.astype(np.float32), "coverage": w, "pixel_A": p, "n_patches": len(rr)}


# --- the reconstructor -----------------------------------------------------------------------------
class AIRPIReconstructor(Reconstructor):
    """AIRPI (Friedrich 2023 ch. 4): a CNN predicts each position's exit wave from its 3×3 CBED kernel and the
    probe; object patches (eq 4.6) are stitched by complex addition (eqs 4.4–4.8). Output: the object phase
    (rad) on the frame's pixel λ/(4α), which is finer than the scan step when the step exceeds it. Needs the
    ``nn`` extra (``pip install -e ".[nn]"``); weights ship in the package (``airpi_train``, seed in the
    sidecar). ``mode: probe_only`` is the no-network baseline (measured amplitude, probe phase)."""

    name = "airpi"
    accepts = ("4dstem",)
    produces = "image"
    version = "2"  # 2: default weights airpi_v2 (dose input, learned smoothing)
    requires = ("jax", "optax")
    install_hint = INSTALL_HINT
    depends_on = ("tembench_pelz2022",)  # load_4d, probe optics and scan geometry helpers (identity)

    class Params(Params):
        weights: str = Field(DEFAULT_WEIGHTS, description="shipped weights name (tembench_friedrich2023/data/"
                             "<name>.npz) or a path to an .npz written by airpi_train")
        mode: Literal["network", "probe_only"] = Field("network", description="network: AIRPI; probe_only: "
                                                       "the no-network baseline (measured amplitude + probe phase)")
        chunk: int = Field(512, ge=1, le=65536, description="scan positions per network call (memory)")
        symmetrise: bool = Field(False, description="average the network's waves over the 8 symmetries of the "
                                 "square (the 3×3 kernel and every pattern rotated / mirrored together, the output "
                                 "mapped back): test-time augmentation at 8× the network work; needs the detector "
                                 "axes along the scan axes and a square step")

    def reconstruct(self, measurement, params, xp):
        from tembench_pelz2022.common import load_4d, probe_optics, scan_origin, scan_step

        if measurement.kind != "4dstem":
            raise TembenchError(f"airpi reconstructs dense 4D-STEM data (kind 4dstem), got {measurement.kind!r}; "
                                "electron events: bin them into frames first")
        step = scan_step(measurement.geometry, self.name)
        if params.symmetrise and params.mode == "network" and abs(step[0] - step[1]) > 1e-9 * max(step):
            raise TembenchError(f"airpi: symmetrise maps the scan's y and x axes onto each other, which needs a square "
                                f"step; scan_step_A is {step[0]:g} × {step[1]:g} Å (set symmetrise: false)")
        if params.mode == "network":
            require_jax()
        x, grid = load_4d(measurement, self.name)
        g = measurement.geometry
        opt = probe_optics(g, self.name)
        reach = min(abs(v) for v in grid.axes_mrad()[0][[0, -1]].tolist() + grid.axes_mrad()[1][[0, -1]].tolist())
        out = reconstruct_airpi(np.asarray(x), grid, step, opt.energy_keV, opt.semiangle_mrad, opt.aberrations,
                                params.mode, params.weights, params.chunk, params.symmetrise)
        extras = {"pixel_A": out["pixel_A"], "n_patches": out["n_patches"], "mode": params.mode,
                  "detector_reach_mrad": reach, "frame_reach_mrad": 2 * opt.semiangle_mrad}
        if params.mode == "network":
            path = weights_path(params.weights)
            extras["weights_sha256"] = _sha256(str(path))
            extras["weights_version"] = weights_metadata(params.weights).get("version") if path.parent == DATA else None
        return Reconstruction(kind="image", data=out["phase"], sampling_A=(out["pixel_A"], out["pixel_A"]),
                              quantity="phase_rad", origin_A=scan_origin(g), extras=extras)



@functools.lru_cache(maxsize=8)
def _sha256(path: str) -> str:
    import hashlib

    return hashlib.sha256(Path(path).read_bytes()).hexdigest()

