"""Pelz et al. 2022: real-time 4D-STEM phase contrast from electron-event data (SSB, DPC/iCOM, virtual detectors).

Modules: ``eer_ops`` (Table I operations on events and dense data), ``ssb`` (eqs 1–3),
``dpc`` (eq 4 and the regularised Fourier integration), ``virtual`` (BF/ABF/ADF/HAADF),
``interactive`` (G(k, K) once, fast refocus), ``synthetic`` (test data); ``plugin`` registers
the reconstructors.
"""
