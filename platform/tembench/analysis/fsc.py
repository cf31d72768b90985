"""Fourier shell correlation (3D volumes) and Fourier ring correlation (2D images).

Shells are spherical (rings circular) in physical spatial frequency |k| = sqrt(Σ (f_i / s_i)²)
in 1/Å, so volumes and images with anisotropic sampling s = (s_z, s_y, s_x) Å are compared on
the same physical shells. Shell j (j = 1 … J) holds the Fourier voxels with
(j − ½)·Δk ≤ |k| < (j + ½)·Δk; the DC term (shell 0) is left out (it carries only the mean,
which is removed). Δk defaults to the coarsest Fourier-pixel size max_i 1/(n_i s_i), so no shell
is empty along any axis; J = floor(k_Nyq / Δk) with k_Nyq = min_i 1/(2 s_i), the largest sphere
inside the Fourier box.

    FSC(j) = Re Σ_{k∈j} F_A(k) F_B*(k) / sqrt(Σ_{k∈j} |F_A(k)|² · Σ_{k∈j} |F_B(k)|²)

summed over the full Fourier space (both Friedel mates; computed from the real FFT with weight 2
on the columns that stand for two voxels). ``n_voxels[j]`` counts those voxels (pixels for a
ring): it is the n_eff of the information thresholds. Sums are accumulated in float64.

Thresholds (van Heel & Schatz 2005, J. Struct. Biol. 151:250–262, the information-based
threshold curves; the equation is written out here rather than cited by number): the FSC
between two half-data sets each with spectral SNR σ, for a shell of n_eff voxels, stays above

    T_σ(n_eff) = (σ + (2√σ + 1)/√n_eff) / (σ + 1 + 2√σ/√n_eff)

with the half-set SNR chosen so the *full* data set (SNR 2σ) carries the wanted information
log2(1 + 2σ):

- one-bit:  2σ = 1       → σ = 0.5:       T = (0.5 + 2.4142/√n) / (1.5 + 1.4142/√n)
- half-bit: 2σ = √2 − 1  → σ = 0.20711:   T = (0.2071 + 1.9102/√n) / (1.2071 + 0.9102/√n)

The same formulas serve the FRC with n_eff = pixels in the ring. Here n_eff = all voxels of the
shell, with no reduction for symmetry or for a particle smaller than the box (pass
``n_eff_scale`` to apply one). Fixed criteria: 0.143 for half-set
FSCs (Rosenthal & Henderson 2003) and 0.5; against a noise-free reference a half-set 0.143
corresponds to C_ref = sqrt(2·0.143/1.143) = 0.5.

Resolution: the first shell where the curve drops below the threshold; the crossing in k is
linearly interpolated between that shell and the one before (on FSC − T), resolution = 1/k in Å.
(Optionally the last crossing, and from a lowest frequency on, for sparse spectra: see
:func:`resolution_at`.)
A curve that never drops below is reported at Nyquist, 1/k_Nyq = 2·max(s), with
``reached = False`` (a bound set by sampling, not a measurement). A curve already below at the
first shell gives 1/k of the first shell (``at_first_shell = True``): no resolution measurable
inside the box.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from tembench.errors import TembenchError

#: criteria accepted by :func:`threshold_curve` (a float is accepted as a fixed threshold too)
CRITERIA = ("onebit", "halfbit", "0.143", "0.5")

_SNR_ONEBIT = 0.5                       # half-set SNR: full set SNR 1, log2(1 + 1) = 1 bit
_SNR_HALFBIT = (math.sqrt(2.0) - 1.0) / 2  # full set SNR √2 − 1, log2(√2) = ½ bit


def information_threshold(n_eff, snr_half: float) -> np.ndarray:
    """van Heel & Schatz (2005) threshold curve T(n_eff) for half-set spectral SNR ``snr_half``:
    (σ + (2√σ + 1)/√n) / (σ + 1 + 2√σ/√n). ``n_eff`` voxels in the shell (pixels in the ring)."""
    n = np.asarray(n_eff, dtype=np.float64)
    s = float(snr_half)
    with np.errstate(divide="ignore", invalid="ignore"):
        r = 1.0 / np.sqrt(n)
        t = (s + (2.0 * math.sqrt(s) + 1.0) * r) / (s + 1.0 + 2.0 * math.sqrt(s) * r)
    return np.where(n > 0, t, np.nan)


def onebit_threshold(n_eff) -> np.ndarray:
    """One-bit curve (0.5 + 2.4142/√n) / (1.5 + 1.4142/√n) (van Heel & Schatz 2005)."""
    return information_threshold(n_eff, _SNR_ONEBIT)


def halfbit_threshold(n_eff) -> np.ndarray:
    """Half-bit curve (0.2071 + 1.9102/√n) / (1.2071 + 0.9102/√n) (van Heel & Schatz 2005)."""
    return information_threshold(n_eff, _SNR_HALFBIT)


def threshold_curve(criterion: str | float, n_eff) -> np.ndarray:
    """Threshold per shell: ``"onebit"``, ``"halfbit"``, ``"0.143"``, ``"0.5"`` or a fixed number."""
    n = np.asarray(n_eff, dtype=np.float64)
    if isinstance(criterion, (int, float)) and not isinstance(criterion, bool):
        return np.full(n.shape, float(criterion))
    c = str(criterion).lower().replace("-", "").replace("_", "").replace(" ", "")
    if c in ("onebit", "1bit"):
        return onebit_threshold(n)
    if c in ("halfbit", "1/2bit"):
        return halfbit_threshold(n)
    try:
        return np.full(n.shape, float(c))
    except ValueError:
        raise TembenchError(f"unknown FSC criterion {criterion!r}; use one of {CRITERIA} or a number") from None


@dataclass(frozen=True)
class Resolution:
    """Where an FSC/FRC curve first drops below a threshold."""

    resolution_A: float       # 1/k at the crossing (Å)
    k_invA: float             # spatial frequency of the crossing (1/Å)
    reached: bool             # False: never below up to the last shell; resolution_A = Nyquist bound
    at_first_shell: bool      # True: already below at the first shell; resolution_A = 1/k of shell 1
    criterion: str


def resolution_at(k_invA, fsc, threshold, nyquist_invA: float | None = None, criterion: str = "", *,
                  k_min_invA: float = 0.0, crossing: str = "first") -> Resolution:
    """Where ``fsc`` drops below ``threshold`` (a number or one value per shell), in Å.

    ``crossing="first"``: the first shell below; ``"last"``: the shell after the last one above
    (for sparse spectra — a crystal's empty shells between Bragg rings, CTF zeros — where the
    first-crossing rule stops at the first gap; with a fixed threshold near the noise level a
    chance excursion can then set the result). Only shells with k ≥ ``k_min_invA`` are searched.
    FSC − T is interpolated linearly between the shell above and the one below; NaN counts as
    below. Never below → ``nyquist_invA`` (default: the last shell's k) with ``reached=False``;
    below from the first searched shell → 1/k of that shell with ``at_first_shell=True``.
    """
    k = np.asarray(k_invA, dtype=np.float64)
    f = np.asarray(fsc, dtype=np.float64)
    t = np.broadcast_to(np.asarray(threshold, dtype=np.float64), f.shape)
    if k.ndim != 1 or k.shape != f.shape or len(k) == 0:
        raise TembenchError(f"resolution_at needs 1-D k and FSC of equal length, got {k.shape} and {f.shape}")
    if crossing not in ("first", "last"):
        raise TembenchError(f"crossing must be 'first' or 'last', got {crossing!r}")
    use = k >= float(k_min_invA)
    if not use.any():
        raise TembenchError(f"k_min_invA {k_min_invA:g} 1/Å lies beyond the last shell ({k[-1]:g} 1/Å)")
    k, d = k[use], (f - t)[use]
    above = d >= 0  # NaN → below
    crit = str(criterion)
    if crossing == "first":
        j = int(np.argmin(above)) if not above.all() else len(k)
    else:
        j = int(np.flatnonzero(above)[-1]) + 1 if above.any() else 0
    if j == len(k):
        kn = float(k[-1] if nyquist_invA is None else nyquist_invA)
        return Resolution(1.0 / kn, kn, False, False, crit)
    if j == 0:
        return Resolution(1.0 / float(k[0]), float(k[0]), True, True, crit)
    d0, d1 = d[j - 1], d[j]
    w = d0 / (d0 - d1) if np.isfinite(d1) and d0 != d1 else 1.0
    kc = float(k[j - 1] + w * (k[j] - k[j - 1]))
    return Resolution(1.0 / kc, kc, True, False, crit)


@dataclass(frozen=True)
class FSCCurve:
    """An FSC (3D) or FRC (2D) curve on physical shells."""

    k_invA: np.ndarray         # shell centres j·Δk (1/Å), j = 1 … J
    fsc: np.ndarray            # correlation per shell (0 where a map has no power in the shell, < 1e-20 of its total)
    n_voxels: np.ndarray       # Fourier voxels (pixels) per shell, both Friedel mates counted
    shell_width_invA: float
    nyquist_invA: float        # min_i 1/(2 s_i)
    ndim: int
    n_eff_scale: float = 1.0   # n_eff = n_eff_scale · n_voxels in the information thresholds

    @property
    def n_eff(self) -> np.ndarray:
        return self.n_voxels * self.n_eff_scale

    def threshold(self, criterion: str | float) -> np.ndarray:
        return threshold_curve(criterion, self.n_eff)

    def resolution(self, criterion: str | float, *, k_min_invA: float = 0.0, crossing: str = "first") -> Resolution:
        """:func:`resolution_at` of this curve against ``criterion`` (not reached → Nyquist)."""
        return resolution_at(self.k_invA, self.fsc, self.threshold(criterion), self.nyquist_invA, str(criterion),
                             k_min_invA=k_min_invA, crossing=crossing)


def hann_edge_mask(shape, sampling_A, edge_A: float) -> np.ndarray:
    """Separable apodisation: 1 inside, a raised-cosine (Hann) roll-off to 0 over ``edge_A`` Å at every
    box face. Pixel i sits at distance d = (min(i, n−1−i) + ½)·s from the face; w = sin²(π d / (2·edge))
    for d < edge."""
    shape = tuple(int(n) for n in shape)
    s = _sampling(sampling_A, len(shape))
    edge = float(edge_A)
    if not edge > 0:
        raise TembenchError(f"mask edge must be > 0 Å, got {edge_A}")
    w = np.ones(shape, dtype=np.float64)
    for axis, (n, si) in enumerate(zip(shape, s)):
        if edge >= 0.5 * n * si:
            raise TembenchError(f"mask edge {edge} Å is not smaller than half the box ({0.5 * n * si:g} Å along axis "
                                f"{axis}); use a narrower mask_edge_A")
        i = np.arange(n)
        d = (np.minimum(i, n - 1 - i) + 0.5) * si
        wa = np.where(d < edge, np.sin(0.5 * np.pi * d / edge) ** 2, 1.0)
        shp = [1] * len(shape)
        shp[axis] = n
        w = w * wa.reshape(shp)
    return w


def _sampling(sampling_A, ndim: int) -> tuple[float, ...]:
    s = np.broadcast_to(np.asarray(sampling_A, dtype=np.float64), (ndim,))
    if not np.all(np.isfinite(s)) or np.any(s <= 0):
        raise TembenchError(f"sampling_A must be positive pixel sizes in Å (one per axis), got {sampling_A}")
    return tuple(float(x) for x in s)


def fourier_shell_correlation(a, b, sampling_A, *, mask_edge_A: float | None = None, mask=None,
                              shell_width_invA: float | None = None, n_eff_scale: float = 1.0) -> FSCCurve:
    """FSC of two volumes (or FRC of two images) of equal shape on physical shells.

    :param sampling_A: pixel size per axis (z, y, x) / (y, x) in Å, or one number.
    :param mask_edge_A: Hann roll-off at the box faces (Å), against edge artefacts of non-periodic maps.
    :param mask: an explicit real-space weight of the same shape (multiplied with the edge mask).
    :param shell_width_invA: Δk; default and minimum max_i 1/(n_i s_i).
    :param n_eff_scale: factor from voxels per shell to n_eff in the thresholds (1 = van Heel's plain count).

    Each map has its mean removed before masking (so the mask itself does not correlate).
    """
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        raise TembenchError(f"FSC needs two maps of the same shape, got {a.shape} and {b.shape}")
    if a.ndim not in (2, 3):
        raise TembenchError(f"FSC/FRC needs 2-D images or 3-D volumes, got {a.ndim}-D data")
    if min(a.shape) < 4:
        raise TembenchError(f"FSC needs at least 4 pixels along every axis, got shape {a.shape}")
    if not (np.all(np.isfinite(a)) and np.all(np.isfinite(b))):
        raise TembenchError("FSC: a map holds NaN or inf values; fill or crop them first")
    s = _sampling(sampling_A, a.ndim)
    w = np.ones(a.shape) if mask is None else np.asarray(mask, dtype=np.float64)
    if w.shape != a.shape:
        raise TembenchError(f"FSC mask shape {w.shape} differs from the maps' shape {a.shape}")
    if mask_edge_A:
        w = w * hann_edge_mask(a.shape, s, mask_edge_A)
    fa = np.fft.rfftn((a - a.mean()) * w)
    fb = np.fft.rfftn((b - b.mean()) * w)

    freqs = [np.fft.fftfreq(n, d=si) for n, si in zip(a.shape[:-1], s[:-1])]
    freqs.append(np.fft.rfftfreq(a.shape[-1], d=s[-1]))
    k2 = np.zeros(fa.shape)
    for axis, f in enumerate(freqs):
        shp = [1] * a.ndim
        shp[axis] = len(f)
        k2 = k2 + f.reshape(shp) ** 2
    kmag = np.sqrt(k2)
    # real-FFT columns 1 … stand for two voxels (k and −k), except the Nyquist column of an even axis
    nx = a.shape[-1]
    wcol = np.full(fa.shape[-1], 2.0)
    wcol[0] = 1.0
    if nx % 2 == 0:
        wcol[-1] = 1.0
    weight = np.broadcast_to(wcol, fa.shape)

    dk_min = max(1.0 / (n * si) for n, si in zip(a.shape, s))
    dk = dk_min if shell_width_invA is None else float(shell_width_invA)
    if dk < dk_min * (1 - 1e-9):
        raise TembenchError(f"shell_width_invA {dk:g} 1/Å is finer than the coarsest Fourier pixel {dk_min:g} 1/Å; "
                            "shells would be empty along some axis")
    k_nyq = min(0.5 / si for si in s)
    n_shells = int(math.floor(k_nyq / dk + 1e-9))
    if n_shells < 1:
        raise TembenchError("FSC: the box is too small for a single shell below Nyquist")
    idx = np.floor(kmag / dk + 0.5).astype(np.int64).ravel()
    keep = (idx >= 1) & (idx <= n_shells)
    idx = idx[keep] - 1
    wv = weight.ravel()[keep]
    fa, fb = fa.ravel()[keep], fb.ravel()[keep]
    num = np.bincount(idx, weights=wv * (fa.real * fb.real + fa.imag * fb.imag), minlength=n_shells)
    pa = np.bincount(idx, weights=wv * (fa.real ** 2 + fa.imag ** 2), minlength=n_shells)
    pb = np.bincount(idx, weights=wv * (fb.real ** 2 + fb.imag ** 2), minlength=n_shells)
    nvox = np.bincount(idx, weights=wv, minlength=n_shells)
    # a shell whose power is at the FFT's round-off level (1e-20 of the map's, i.e. amplitude 1e-10) holds no
    # signal: its "correlation" would be the correlation of round-off, so it is reported as 0
    live = (pa > 1e-20 * max(pa.sum(), 1e-300)) & (pb > 1e-20 * max(pb.sum(), 1e-300))
    fsc = np.zeros(n_shells)
    fsc[live] = num[live] / np.sqrt(pa[live] * pb[live])
    return FSCCurve(k_invA=dk * np.arange(1, n_shells + 1), fsc=fsc, n_voxels=nvox.round().astype(np.int64),
                    shell_width_invA=dk, nyquist_invA=k_nyq, ndim=a.ndim, n_eff_scale=float(n_eff_scale))


def fourier_ring_correlation(a, b, sampling_A, **kwargs) -> FSCCurve:
    """FRC of two 2-D images: :func:`fourier_shell_correlation` restricted to images."""
    if np.ndim(a) != 2:
        raise TembenchError(f"FRC needs 2-D images, got shape {np.shape(a)}")
    return fourier_shell_correlation(a, b, sampling_A, **kwargs)


__all__ = ["CRITERIA", "FSCCurve", "Resolution", "fourier_ring_correlation", "fourier_shell_correlation",
           "halfbit_threshold", "hann_edge_mask", "information_threshold", "onebit_threshold", "resolution_at",
           "threshold_curve"]
