"""Conversion of counted 4D-STEM data to the electron-event representation (Pelz 2022 §II)."""

from __future__ import annotations

import numpy as np

from tembench import NoiseModel, Params, hookimpl
from tembench.eer import EER_AXES, EER_KIND, ElectronEvents
from tembench.errors import TembenchError
from tembench.types import Measurement


class ElectronEventsConversion(NoiseModel):
    """Counted 4D-STEM → linear-index electron events (kind ``eer``), lossless.

    Needs electron counts, i.e. ``poisson_dose`` earlier in the noise chain. The result has
    ``data`` None and the :class:`tembench.eer.ElectronEvents` in ``extras["events"]``; the
    geometry is kept. Provenance records the compression ratio (dense float32 bytes / EER bytes)
    and the electrons per pixel.
    """

    name = "electron_events"
    accepts = ("4dstem",)
    produces = EER_KIND
    version = "1"

    class Params(Params):
        pass

    def apply(self, measurement: Measurement, params: Params, rng: np.random.Generator) -> Measurement:
        m = measurement
        if m.kind != "4dstem":
            raise TembenchError(f"electron_events: accepts a counted '4dstem' measurement, got {m.kind!r}")
        if not m.counted:
            raise TembenchError("electron_events: the 4D-STEM measurement is not counted (intensities, not "
                                "electrons). Put `poisson_dose` with a finite dose before `electron_events` "
                                "in the noise chain.")
        data = np.asarray(m.data)
        if data.ndim != 4:
            raise TembenchError(f"electron_events: needs data (scan_y, scan_x, k_y, k_x), got shape {data.shape}")
        events = ElectronEvents.from_dense(data)
        ratio = events.dense_nbytes(np.float32) / max(events.nbytes, 1)
        record = {"component": self.name, "n_events": events.n_events, "eer_nbytes": events.nbytes,
                  "compression_vs_float32": ratio, "electrons_per_pixel": events.electrons_per_pixel}
        return Measurement(kind=EER_KIND, data=None, axes=EER_AXES, geometry=m.geometry, counted=True,
                           provenance=[*m.provenance, record], extras={**m.extras, "events": events})


@hookimpl
def tembench_register_noise_models():
    return [ElectronEventsConversion]
