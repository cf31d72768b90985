"""Ren, Ophus, Chen & Waller 2020: multiple-scattering phase-contrast atomic electron tomography.

Modules: ``model`` (the reconstruction's rotate → bin → multislice → defocus forward model and its
gradient, Algs. 1–2), ``prox`` (positivity, LASSO and 3D TV proximal operators, §2.5),
``reconstructor`` (Alg. 3, reconstructor ``ren2020_multislice_aet``), ``table1`` (the paper's
Table 1 and the report section that sets a run beside it); ``plugin`` registers them.
"""
