"""tembench physics engine: one multislice core for simulation and reconstruction.

Modules
-------
constants    relativistic wavelength λ(E) and interaction constant σ(E) (CODATA 2018)
grid         FFT-order spatial frequencies, FFT-friendly sizes
optics       aberration function χ (Δf = −C10), apertures, CTF with envelopes, probes, Scherzer
potentials   Lobato/Kirkland projected potentials per slice and 3D voxel potentials (exact sub-pixel)
propagation  band-limited Fresnel / angular-spectrum propagators
multislice   plane-wave multislice, its adjoint, HRTEM defocus series, amplitude loss + gradients
stem         4D-STEM scans: batch cropping, mixed-state probes, virtual detectors, streaming, gradients
rotation     volume rotations (axis / RELION Euler) with exact adjoints, slice binning B_N and B_N†
coherence    partial coherence by incoherent sums (defocus, illumination angle), detector binning
memory       up-front memory estimates raising ResourceError
"""
