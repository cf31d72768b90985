"""Atomic-structure helpers shared by sample components (not components themselves).

- :mod:`tembench.structures.crystal`: bulk crystals by name or file, zone-axis orientation,
  orthogonal supercells, filling boxes and shapes (sphere, cube, needle), thermal rms.
- :mod:`tembench.structures.amorphous`: random tetrahedral network for amorphous SiO2 / Al2O3.
- :mod:`tembench.structures.defects`: vacancies, substitutions, edge-dislocation displacement.
"""
