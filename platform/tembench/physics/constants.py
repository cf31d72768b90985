"""Physical constants (CODATA 2018, exact SI where defined) and relativistic electron optics.

Units: energies in keV, lengths in Å, potentials in V; σ in rad/(V·Å).
"""

from __future__ import annotations

import math

from tembench.errors import TembenchError

# CODATA 2018 (h, c, e are exact in the 2019 SI).
PLANCK_J_S = 6.62607015e-34
SPEED_OF_LIGHT_M_S = 299792458.0
ELEMENTARY_CHARGE_C = 1.602176634e-19
ELECTRON_MASS_KG = 9.1093837015e-31
BOHR_RADIUS_A = 0.529177210903
# e / (4π ε0) in V·Å: the Coulomb potential of a unit charge at 1 Å.
COULOMB_V_A = 14.399645478425668

ELECTRON_REST_ENERGY_KEV = ELECTRON_MASS_KG * SPEED_OF_LIGHT_M_S**2 / ELEMENTARY_CHARGE_C / 1e3  # 510.99895 keV
HC_KEV_A = PLANCK_J_S * SPEED_OF_LIGHT_M_S / ELEMENTARY_CHARGE_C / 1e3 * 1e10  # 12.398419843 keV·Å

# h²/(2π m0 e) = 2π a0 · e/(4π ε0) in V·Å²: converts an electron scattering factor f_e (Å) to a
# potential, V(r) = K ∫ f_e(q) exp(2πi q·r) d³q (Kirkland 2010, eq 5.9).
SCATTERING_FACTOR_TO_POTENTIAL_V_A2 = 2.0 * math.pi * BOHR_RADIUS_A * COULOMB_V_A


def _check_energy(energy_keV: float) -> float:
    e = float(energy_keV)
    if not math.isfinite(e) or e <= 0:
        raise TembenchError(
            f"energy_keV must be a positive, finite beam energy in keV (e.g. 80, 200, 300); got {energy_keV!r}"
        )
    return e


def wavelength_A(energy_keV: float) -> float:
    """Relativistic electron wavelength λ = hc / sqrt(E (E + 2 m0c²)) in Å (E in keV)."""
    e = _check_energy(energy_keV)
    return HC_KEV_A / math.sqrt(e * (e + 2.0 * ELECTRON_REST_ENERGY_KEV))


def relativistic_mass_factor(energy_keV: float) -> float:
    """γ = 1 + E / m0c²."""
    return 1.0 + _check_energy(energy_keV) / ELECTRON_REST_ENERGY_KEV


def interaction_constant(energy_keV: float) -> float:
    """Relativistic interaction constant σ = 2π γ m0 e λ / h² in rad/(V·Å).

    Equivalent to Kirkland's σ = (2π / λV) (m0c² + eV) / (2 m0c² + eV); a slice of projected
    potential v (V·Å) multiplies the wave by exp(iσv).
    """
    e = _check_energy(energy_keV)
    lam_m = wavelength_A(e) * 1e-10
    gamma = relativistic_mass_factor(e)
    sigma_per_V_m = 2.0 * math.pi * gamma * ELECTRON_MASS_KG * ELEMENTARY_CHARGE_C * lam_m / PLANCK_J_S**2
    return sigma_per_V_m * 1e-10  # rad/(V·m) → rad/(V·Å)
