"""Scintillator–photomultiplier (PMT) detector noise for integrating (HA)ADF/BF detectors (Friedrich 2023 §2.2.1).

Model (eqs 2.3–2.13): an incident electron makes m_c photons at the photocathode (≈ 1 per kV
of acceleration voltage after the light guide), each converted with quantum efficiency η;
the photoelectrons are multiplied by n dynodes of gain δ (G = δⁿ, eq 2.8). The anode charge
per electron is Gaussian (eq 2.11) with mean m_c η G and standard deviation

    σ₁ = m_c η G · sqrt[(1 − η + 1/(δ − 1)) / (m_c η) + σ_c² / m_c²],

σ_c being the spread of the photon count (Poisson: σ_c² = m_c). For k detected electrons the
responses add independently, σ(k) = √k σ₁ — eq 2.11 with m_c → k m_c and σ_c² → k σ_c²,
the "m_c must be scaled accordingly" of eq 2.13. Noise is applied as eq 2.12–2.13:
k ~ Poisson(α x), then k + N(0, σ(k)) in units of one electron's mean response, divided by α
if ``output: normalized``.
"""

from __future__ import annotations

import math
import os
from typing import Literal

import numpy as np
from pydantic import Field

from tembench import NoiseModel, hookimpl
from tembench.builtin.noise import DoseParams, dose_bookkeeping, iter_chunks, map_chunks, poisson_counts, stream_token
from tembench.builtin.scan_distortions import noise_chain_names
from tembench.errors import TembenchError
from tembench.types import Measurement


def single_electron_relative_sigma(photons_per_electron: float, quantum_efficiency: float, dynode_gain: float,
                                   photon_count_std: float | None = None) -> float:
    """σ₁ / (m_c η G): eq 2.11 relative to the mean anode response of one electron."""
    m_c, eta, delta = photons_per_electron, quantum_efficiency, dynode_gain
    sc2 = m_c if photon_count_std is None else photon_count_std**2
    return math.sqrt((1.0 - eta + 1.0 / (delta - 1.0)) / (m_c * eta) + sc2 / m_c**2)


class ScintillatorPMT(NoiseModel):
    """Scintillator + photomultiplier noise of an integrating (HA)ADF/BF detector (Friedrich 2023 eqs 2.3–2.13).

    Poisson electron counting at the dose (unless the input is already counted by
    ``poisson_dose``), then a signal-dependent Gaussian: each detected electron gives a pulse of
    relative width σ₁ = sqrt[(1 − η + 1/(δ−1))/(m_c η) + σ_c²/m_c²] (eq 2.11; ≈0.13 with the
    defaults at 300 kV), so a low-dose histogram shows evenly spaced single-electron peaks
    (Fig. 2.3). Defaults from the thesis: m_c = 1 photon per kV, η = 0.25, δ = 4, n = 10.
    ``output``: ``electrons`` (one electron = 1), ``normalized`` (divided by α: eq 2.13, back
    to the input's intensity scale) or ``anode`` (electrons at the PMT anode, × m_c η δⁿ).

    Chain order (Ch. 2): ``source_size`` → ``scan_jitter`` → ``scintillator_pmt`` →
    ``fast_scan_smear``. Refused: a second ``scintillator_pmt`` (detector noise applied twice),
    input already smeared by ``fast_scan_smear`` (the smear is this detector's response, after
    it), and counted input that is no longer whole electron counts (counts interpolated or
    blurred after ``poisson_dose``).
    """

    name = "scintillator_pmt"
    accepts = ("*",)
    streams_disk_data = True  # a memory-mapped input is read and written chunk by chunk

    class Params(DoseParams):
        dose_e_per_A2: float = Field(math.inf, gt=0, description="dose in e/Å² per image (ignored if the input "
                                     "is already counted); inf = no shot noise, detector noise only on α·x")
        energy_keV: float | None = Field(None, gt=0, description="acceleration voltage in kV (None: from geometry, "
                                         "else 300)")
        photons_per_kV: float = Field(1.0, gt=0, description="photons reaching the photocathode per electron "
                                      "per kV (Ishikawa: ≈20/kV × 5 % light-guide efficiency)")
        photon_count_std: float | None = Field(None, ge=0, description="σ_c of the photon count per electron; "
                                               "None = Poisson, sqrt(m_c)")
        quantum_efficiency: float = Field(0.25, gt=0, le=1, description="photocathode quantum efficiency η")
        dynode_gain: float = Field(4.0, gt=1, description="secondary-emission yield per dynode δ")
        n_dynodes: int = Field(10, ge=1, description="number of dynodes n (G = δⁿ)")
        dark_noise_std_electrons: float = Field(0.0, ge=0, description="extra signal-independent Gaussian "
                                                "readout noise, in electrons (not in the thesis; 0 = off)")
        output: Literal["electrons", "normalized", "anode"] = "electrons"

    def apply(self, measurement: Measurement, params: Params, rng: np.random.Generator) -> Measurement:
        m = measurement
        if any(a.startswith("k_") for a in m.axes) or m.kind == "eer":
            raise TembenchError(f"scintillator_pmt models an integrating ADF/BF detector; {m.kind!r} comes from a "
                                "pixelated camera. Use poisson_dose for 4D-STEM, or integrate a virtual detector first.")
        chain = noise_chain_names(m)
        if self.name in chain:
            raise TembenchError(f"scintillator_pmt: the measurement already carries scintillator–PMT detector noise "
                                f"(noise chain so far: {chain}); detector noise is applied once, to the electron "
                                "counts. Remove the second scintillator_pmt from the noise chain.")
        if "fast_scan_smear" in chain:
            raise TembenchError(f"scintillator_pmt: the input was already smeared by fast_scan_smear (noise chain so "
                                f"far: {chain}); the smear is the response of this detector to the electrons it "
                                "detects. Order the chain source_size → scan_jitter → scintillator_pmt → "
                                "fast_scan_smear.")
        if m.counted and not all(np.array_equal(c, np.round(c)) for c in iter_chunks(m.data)):
            raise TembenchError(f"scintillator_pmt: the counted input is not whole electron counts (noise chain so "
                                f"far: {chain}): it was changed after counting. Put scintillator_pmt directly after "
                                "poisson_dose (or give it the dose itself), before fast_scan_smear.")
        energy = params.energy_keV or m.geometry.energy_keV or 300.0
        m_c = params.photons_per_kV * energy
        rel = single_electron_relative_sigma(m_c, params.quantum_efficiency, params.dynode_gain, params.photon_count_std)
        geometry = m.geometry
        gain = m_c * params.quantum_efficiency * params.dynode_gain**params.n_dynodes
        # a disk-backed input (a memory map over a .npy file) is streamed chunk by chunk into new files;
        # the draws are the same sequential streams either way: every Poisson count first, then every
        # Gaussian, so the values do not depend on the path or the chunk size
        token = stream_token(m.data, self.name, self.version, params.model_dump(mode="json"), rng.bit_generator.state)
        scratch = None
        if m.counted:
            counts = m.data
            alpha = float(m.geometry.extra.get("electrons_per_unit_intensity", 1.0))
        else:
            alpha, geometry = dose_bookkeeping(m, params.dose_e_per_A2, params.dose_mode, params.electrons_per_pattern,
                                               who=self.name)
            if math.isinf(alpha):
                raise TembenchError("scintillator_pmt needs a finite dose (dose_e_per_A2 or electrons_per_pattern) "
                                    "or an input already counted by poisson_dose: the detector noise is per electron.")
            counts = poisson_counts(m.data, alpha, rng, token=token, tag=f"{self.name}-counts")
            scratch = getattr(counts, "filename", None) if token is not None else None
        dark = params.dark_noise_std_electrons

        def respond(chunk):
            c = chunk.astype(np.float64)
            sigma = rel * np.sqrt(np.clip(c, 0, None))
            if dark > 0:
                sigma = np.hypot(sigma, dark)
            signal = c + rng.standard_normal(c.shape) * sigma
            if params.output == "normalized":
                signal = signal / alpha
            elif params.output == "anode":
                signal = signal * gain
            return signal

        try:
            signal = map_chunks(counts, respond, np.float32, token=token, tag=self.name)
        finally:
            if scratch is not None:  # the intermediate counts file (the mapping stays valid until released)
                del counts
                os.unlink(scratch)
        record = {"component": self.name, "params": params.model_dump(), "photons_per_electron": m_c,
                  "single_electron_relative_sigma": rel, "electrons_per_unit_intensity": alpha,
                  "anode_gain_per_electron": gain}
        return m.replace(data=signal, counted=True, geometry=geometry,
                         provenance=[*m.provenance, record])


@hookimpl
def tembench_register_noise_models():
    return [ScintillatorPMT]
