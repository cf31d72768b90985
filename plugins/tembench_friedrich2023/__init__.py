"""Friedrich 2023 (thesis, chapter 2): quantitative ADF-STEM — column fitting, scattering
cross-sections, atom counting, Cramér–Rao lower bounds and CNN restoration.

``plugin`` registers the components.
"""
