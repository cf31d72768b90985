"""A small fully convolutional U-Net in plain JAX for ADF-STEM restoration (Friedrich 2023 §2.5, simplified).

The thesis trains a cGAN (CGRDN generator + patch discriminator). Here the generator is a
small U-Net trained with pixel-wise losses only (L1 + Fourier-space L1 + mean constraint, the
non-adversarial part of the thesis' eq 2.42): the adversarial term sharpens images but is
not needed for — and may bias — quantitative column intensities, and a GAN would not train in
the time budget on 2 CPU cores. Parameters are a plain pytree (dict of arrays); convolutions
are ``jax.lax.conv_general_dilated`` in NCHW, so no flax/equinox is needed.

Architecture (widths ``w = (16, 32, 48)`` by default): per level two 3×3 conv + SiLU; 2×2
down-sampling by a stride-2 3×3 conv; up-sampling by nearest-neighbour ×2 + 3×3 conv;
skip connections by concatenation; a 1×1 output conv; a global residual (output = input +
network), as in the thesis' GRDN. Down-sampling factor 4: images are reflect-padded to a
multiple of 16 (≥ 8 px margin) and cropped back, so any image size works.

Normalisation: per image, ``s = mean(clip(x, q0.1 %, q99.9 %))`` (robust to hot/dead pixels);
the network sees ``x / s`` and its output is multiplied by ``s``, so the restored image is in
the raw image's units (electrons, normalised intensity, anode counts …). No offset is
subtracted: an ADF image's zero is physical (no electrons), and a scale-only map keeps it.
"""

from __future__ import annotations

import math

import numpy as np

DOWN = 4          # total down-sampling factor of the U-Net
MARGIN = 8        # reflect-padding margin (px) so edge effects stay out of the returned image
BUCKET = 16       # padded sizes are multiples of this (a multiple of DOWN): fewer shapes to compile
DEFAULT_WIDTHS = (16, 32, 48)


def _jax():
    import jax
    import jax.numpy as jnp

    return jax, jnp


# --- parameters ----------------------------------------------------------------------------------
def conv_shapes(widths=DEFAULT_WIDTHS) -> dict[str, tuple[int, int, int, int]]:
    """Name → (out, in, kh, kw) of every conv kernel (bias shapes are (out,))."""
    w0, w1, w2 = widths
    return {
        "e0a": (w0, 1, 3, 3), "e0b": (w0, w0, 3, 3),
        "d0": (w1, w0, 3, 3),
        "e1a": (w1, w1, 3, 3), "e1b": (w1, w1, 3, 3),
        "d1": (w2, w1, 3, 3),
        "ba": (w2, w2, 3, 3), "bb": (w2, w2, 3, 3),
        "u1": (w1, w2, 3, 3),
        "c1a": (w1, 2 * w1, 3, 3), "c1b": (w1, w1, 3, 3),
        "u0": (w0, w1, 3, 3),
        "c0a": (w0, 2 * w0, 3, 3), "c0b": (w0, w0, 3, 3),
        "out": (1, w0, 1, 1),
    }


def init_params(seed: int, widths=DEFAULT_WIDTHS) -> dict[str, np.ndarray]:
    """He-normal kernels, zero biases; the output conv starts at zero (the net starts as the identity)."""
    return he_init(conv_shapes(widths), seed)


def he_init(shapes: dict, seed: int) -> dict[str, np.ndarray]:
    """``{name/w, name/b}`` for conv kernels of ``shapes`` (out, in, kh, kw): He-normal weights, zero biases,
    and a zero ``out`` kernel (a network with a skip connection starts as its skip)."""
    rng = np.random.default_rng(seed)
    params = {}
    for name, shape in shapes.items():
        fan_in = shape[1] * shape[2] * shape[3]
        w = rng.standard_normal(shape) * math.sqrt(2.0 / fan_in)
        if name == "out":
            w = np.zeros(shape)
        params[f"{name}/w"] = w.astype(np.float32)
        params[f"{name}/b"] = np.zeros(shape[0], np.float32)
    return params


def n_parameters(params) -> int:
    return int(sum(np.size(v) for v in params.values()))


# --- network -------------------------------------------------------------------------------------
def _conv(jnp, jax, x, params, name, stride=1):
    w, b = params[f"{name}/w"], params[f"{name}/b"]
    pad = "SAME" if w.shape[-1] > 1 else "VALID"
    y = jax.lax.conv_general_dilated(x, w, (stride, stride), pad, dimension_numbers=("NCHW", "OIHW", "NCHW"))
    return y + b[None, :, None, None]


def forward(params, x):
    """U-Net on a batch ``x`` (N, 1, H, W) with H, W multiples of 4; returns (N, 1, H, W)."""
    jax, jnp = _jax()
    act = jax.nn.silu

    def block(h, a, b):
        return act(_conv(jnp, jax, act(_conv(jnp, jax, h, params, a)), params, b))

    def up(h, name):
        h = jnp.repeat(jnp.repeat(h, 2, axis=2), 2, axis=3)
        return act(_conv(jnp, jax, h, params, name))

    e0 = block(x, "e0a", "e0b")
    e1 = block(act(_conv(jnp, jax, e0, params, "d0", stride=2)), "e1a", "e1b")
    bt = block(act(_conv(jnp, jax, e1, params, "d1", stride=2)), "ba", "bb")
    c1 = block(jnp.concatenate([up(bt, "u1"), e1], axis=1), "c1a", "c1b")
    c0 = block(jnp.concatenate([up(c1, "u0"), e0], axis=1), "c0a", "c0b")
    return x + _conv(jnp, jax, c0, params, "out")


# --- normalisation and padding ------------------------------------------------------------------
def robust_scale(image: np.ndarray) -> float:
    """Per-image scale s: mean of the image clipped to its 0.1–99.9 % quantiles (hot/dead pixels)."""
    x = np.asarray(image, dtype=np.float64)
    lo, hi = np.quantile(x, [0.001, 0.999])
    s = float(np.mean(np.clip(x, lo, hi)))
    if not np.isfinite(s) or s <= 0:
        s = float(np.std(x))
    if not np.isfinite(s) or s <= 0:
        s = 1.0
    return s


def pad_amounts(n: int) -> tuple[int, int]:
    """(before, after) padding of an axis of length n: MARGIN each side, then up to a multiple of BUCKET."""
    total = n + 2 * MARGIN
    extra = (-total) % BUCKET
    return MARGIN, MARGIN + extra


def pad_image(x: np.ndarray) -> tuple[np.ndarray, tuple[slice, slice]]:
    """Reflect-pad a 2D image for the U-Net (symmetric mode also works for images smaller than MARGIN)."""
    py, px = pad_amounts(x.shape[0]), pad_amounts(x.shape[1])
    padded = np.pad(x, (py, px), mode="symmetric")
    return padded, (slice(py[0], py[0] + x.shape[0]), slice(px[0], px[0] + x.shape[1]))


# --- weights I/O ---------------------------------------------------------------------------------
def save_weights(path, params, widths) -> None:
    np.savez_compressed(path, widths=np.asarray(widths, np.int64),
                        **{k: np.asarray(v, np.float32) for k, v in params.items()})


def load_weights_file(path) -> tuple[dict[str, np.ndarray], tuple[int, ...]]:
    with np.load(path, allow_pickle=False) as z:
        widths = tuple(int(v) for v in z["widths"])
        params = {k: np.asarray(z[k], np.float32) for k in z.files if k != "widths"}
    missing = set(f"{n}/{t}" for n in conv_shapes(widths) for t in ("w", "b")) - set(params)
    if missing:
        raise ValueError(f"weights file {path} lacks {sorted(missing)}")
    return params, widths
