"""Worker run in py4DSTEM's own environment: py4DSTEM 0.14.18 SSB on every saved dataset of a list.

    python pelz2022_ssb_quality_worker.py IN_1.npz OUT_1.npz [IN_2.npz OUT_2.npz ...]

Each input holds ``data`` (scan_y, scan_x, k_y, k_x), ``energy_keV``, ``semiangle_mrad``,
``step_A``, ``det_mrad`` and ``defocus_A`` (Δf > 0 underfocus, py4DSTEM's ``defocus`` = −C10 as
ours). The rotation is forced to 0° without transpose (the simulated scan and detector are
aligned: py4DSTEM's best case; it does not have to estimate it). Writes ``phase`` =
angle(object) to each output. Prints nothing on success.
"""

from __future__ import annotations

import sys

import numpy as np


def ssb_py4dstem(d) -> np.ndarray:
    import py4DSTEM

    dc = py4DSTEM.DataCube(data=np.asarray(d["data"]))
    dc.calibration.set_R_pixel_size(float(d["step_A"]))
    dc.calibration.set_R_pixel_units("A")
    dc.calibration.set_Q_pixel_size(float(d["det_mrad"]))
    dc.calibration.set_Q_pixel_units("mrad")
    r = py4DSTEM.process.phase.SSB(energy=float(d["energy_keV"]) * 1e3, datacube=dc,
                                   semiangle_cutoff=float(d["semiangle_mrad"]), defocus=float(d["defocus_A"]),
                                   verbose=False, device="cpu")
    r.preprocess(plot_center_of_mass=None, plot_rotation=False, plot_overlap_trotters=False,
                 force_com_rotation=0.0, force_com_transpose=False)
    r.reconstruct(progress_bar=False, num_jobs=1)
    return np.angle(np.asarray(r.object))


def main(argv):
    if len(argv) % 2:
        raise SystemExit("usage: pelz2022_ssb_quality_worker.py IN.npz OUT.npz [IN.npz OUT.npz ...]")
    for src, dst in zip(argv[::2], argv[1::2]):
        d = dict(np.load(src))
        np.savez(dst, phase=np.asarray(ssb_py4dstem(d), dtype=np.float64))


if __name__ == "__main__":
    main(sys.argv[1:])
