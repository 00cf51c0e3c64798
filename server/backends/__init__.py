"""Backends: arrays in, arrays out. See base.py for the protocols, registry.py for lookup."""
