"""CNN restoration of ADF-STEM images (Friedrich 2023 §2.3–2.5) as a step of the noise chain.

``cnn_restore`` runs the shipped U-Net (:mod:`restore_unet`, trained by
``python -m tembench_friedrich2023.nn_train_restore``) on a degraded ADF image and returns the
restored image in the same units, so every quantifier can be scored raw vs restored: put it
last in the noise chain and sweep ``noise.cnn_restore.enabled: [false, true]`` — the noise
realisation is the same for both values (the step draws no random numbers).

Needs JAX (``pip install -e ".[nn]"``); jax is imported only when the step runs, so
``tembench list`` works without it and a scenario using the step fails with that hint.
Weights ship in ``tembench_friedrich2023/data/<weights>.npz`` with a JSON sidecar (recipe,
seed, loss history, held-out metrics); nothing is downloaded.

Determinism: the same image gives the same bits in one environment (XLA's CPU convolutions
are deterministic for a fixed shape; default and single-thread XLA gave identical bits here);
across CPUs or jax versions the last bits may differ (float32 summation order).
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import numpy as np
from pydantic import Field

from tembench import NoiseModel, Params
from tembench.errors import TembenchError
from tembench.types import Measurement

DATA = Path(__file__).parent / "data"
DEFAULT_WEIGHTS = "restore_unet_v1"
#: measurement.extras key of the image as it was before restoration (the CRLB is that measurement's)
UNRESTORED = "unrestored_data"
INSTALL_HINT = 'pip install -e ".[nn]"  (installs jax and optax)'
ACCEPTED_KINDS = ("adf_image",)


def jax_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("jax") is not None


def _require_jax(who: str):
    try:
        import jax  # noqa: F401
    except ImportError as exc:
        raise TembenchError(f"{who} needs JAX, which is not installed here. Install the neural-network extra: "
                            f"{INSTALL_HINT}; or remove the step from the noise chain.") from exc


def weights_path(weights: str) -> Path:
    """A shipped weights name (``restore_unet_v1``) or a path to an ``.npz`` file."""
    p = Path(weights)
    if p.suffix == ".npz":
        if not p.exists():
            raise TembenchError(f"cnn_restore: weights file {weights!r} does not exist.")
        return p
    shipped = DATA / f"{weights}.npz"
    if not shipped.exists():
        known = sorted(q.stem for q in DATA.glob("restore_unet_*.npz"))
        raise TembenchError(f"cnn_restore: no shipped weights named {weights!r}; available: {known or '(none)'}, "
                            "or give a path to an .npz file written by nn_train_restore.")
    return shipped


def weights_metadata(weights: str = DEFAULT_WEIGHTS) -> dict:
    """The JSON sidecar of shipped weights (recipe, seed, loss history, held-out metrics)."""
    side = weights_path(weights).with_suffix(".json")
    return json.loads(side.read_text()) if side.exists() else {}


@functools.lru_cache(maxsize=4)
def _network(path: str):
    """(jitted forward, params on device) for a weights file; cached per process."""
    import jax
    import jax.numpy as jnp

    from tembench_friedrich2023 import restore_unet as U

    params, _ = U.load_weights_file(path)
    params = {k: jnp.asarray(v) for k, v in params.items()}
    return jax.jit(U.forward), params


def restore_array(image: np.ndarray, weights: str = DEFAULT_WEIGHTS) -> np.ndarray:
    """Restore one 2D image with the network; same shape and units as the input (float32)."""
    from tembench_friedrich2023 import restore_unet as U

    x = np.asarray(image, dtype=np.float64)
    s = U.robust_scale(x)
    padded, crop = U.pad_image(x / s)
    fwd, params = _network(str(weights_path(weights)))
    y = np.asarray(fwd(params, padded[None, None].astype(np.float32)))[0, 0]
    return (y[crop].astype(np.float64) * s).astype(np.float32)


def restore_image(image: np.ndarray, weights: str = DEFAULT_WEIGHTS) -> np.ndarray:
    """Restore an ADF-STEM image (…, y, x): jitter, PMT/Poisson noise and fast-scan smear removed.

    The last two axes are the scan (y slow, x fast, lines along x); leading axes (tilts,
    frames) are restored one image at a time. Output is float32 in the input's units (the
    network works on ``image / s`` with a per-image robust scale ``s`` and multiplies back).
    """
    _require_jax("restore_image")
    x = np.asarray(image)
    if x.ndim < 2:
        raise TembenchError(f"restore_image needs a 2D image (y, x) or a stack (..., y, x); got shape {x.shape}.")
    if min(x.shape[-2:]) < 4:
        raise TembenchError(f"restore_image: image {x.shape[-2:]} is too small (at least 4 x 4 scan positions).")
    if not np.all(np.isfinite(x)):
        raise TembenchError("restore_image: the image contains NaN or inf; mask or replace those pixels first.")
    flat = x.reshape(-1, *x.shape[-2:])
    out = np.stack([restore_array(f, weights) for f in flat])
    return out.reshape(x.shape)


class CNNRestore(NoiseModel):
    """CNN restoration of a degraded ADF-STEM image (Friedrich 2023 §2.5), last in the noise chain; needs JAX: pip install -e ".[nn]".

    Removes scan jitter, scintillator–PMT/Poisson noise and fast-scan smear learnt from
    synthetic pairs (``nn_train_restore``), keeping the raw image's intensity units. The
    target of the restoration is the source-size-broadened noise-free image (the source size
    is not deconvolved). ``enabled: false`` passes the data through unchanged, so a sweep over
    ``enabled`` scores raw and restored images of the same noise realisation. The unrestored
    image stays in ``extras["unrestored_data"]``: the ``crlb`` quantifier judges a fit of the
    restored image against the bound of the measured (raw) data. Needs the ``nn``
    extra (``pip install -e ".[nn]"``).
    """

    name = "cnn_restore"
    accepts = ACCEPTED_KINDS
    # 2: keeps the unrestored image in extras["unrestored_data"] (the crlb quantifier's bound is that of
    # the raw measurement, not of the restored image's fitted model)
    version = "2"
    requires = ("jax", "optax")
    install_hint = INSTALL_HINT

    class Params(Params):
        enabled: bool = Field(True, description="false: identity (raw image), for raw-vs-restored sweeps")
        weights: str = Field(DEFAULT_WEIGHTS, description="shipped weights name (tembench_friedrich2023/data/"
                             "<name>.npz) or a path to an .npz from nn_train_restore")

    def apply(self, measurement: Measurement, params: Params, rng: np.random.Generator) -> Measurement:
        m = measurement
        if m.kind not in self.accepts or any(a.startswith("k_") for a in m.axes):
            raise TembenchError(
                f"cnn_restore restores ADF-STEM images (kinds {', '.join(self.accepts)}); got {m.kind!r} with axes "
                f"{m.axes}. For 4D-STEM, form a virtual ADF image first (stem4d output: image).")
        if not params.enabled:
            return m.replace(provenance=[*m.provenance, {"component": self.name, "params": params.model_dump()}])
        _require_jax("cnn_restore")
        if m.axes[-2:] not in (("scan_y", "scan_x"), ("y", "x")):
            raise TembenchError(f"cnn_restore expects the scan axes last (scan_y, scan_x); got axes {m.axes}.")
        path = weights_path(params.weights)
        data = restore_image(m.data, str(path))
        import jax

        meta = weights_metadata(params.weights) if path.parent == DATA else {}
        record = {"component": self.name, "params": params.model_dump(), "jax_version": jax.__version__,
                  "weights_version": meta.get("version"), "weights_sha256": _sha256(path)}
        extras = dict(m.extras)
        extras[UNRESTORED] = np.asarray(m.data).copy()   # what was measured: the CRLB is a property of it
        if "virtual_images" in extras:
            # companion detector images were not restored: drop them so nobody scores them as restored
            extras.pop("virtual_images")
            record["dropped_extras"] = ["virtual_images"]
        return m.replace(data=data, extras=extras, provenance=[*m.provenance, record])


@functools.lru_cache(maxsize=8)
def _sha256(path: Path) -> str:
    import hashlib

    return hashlib.sha256(Path(path).read_bytes()).hexdigest()
