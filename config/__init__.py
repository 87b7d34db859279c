"""Example line configs, installed as the package `linectl.examples` (package data, see pyproject.toml).

The YAML files are what matters; this file only makes the folder a regular package, so importlib.resources finds
the examples the same way from a checkout (editable install) and from a wheel.
"""
