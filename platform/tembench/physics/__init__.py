"""Shared physics: constants, optics, potentials, propagation, multislice, rotations."""
