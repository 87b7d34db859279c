"""linectl: serialization and track & trace line controller."""

__version__ = "0.1.0"
