"""The package version, read by the CLI and re-exported as ``admmprune.__version__``."""

__version__ = "0.1.0"
