"""The package version, recorded in every artifact the tool writes."""

__version__ = "0.1.0"
