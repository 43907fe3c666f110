"""The package version, importable from every layer (the root package imports everything else)."""

__version__ = "0.1.0"
