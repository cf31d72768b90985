"""You, Romanov & Pelz 2025: multislice electron ptychography (mixed-state probe, position correction)
and, in part 2, joint ptychographic tomography.

Modules: ``msp`` (Algorithm 1, eqs 1–11); ``plugin`` registers the components.
"""
