"""The version of miner3d (read by the build, see pyproject.toml)."""

__version__ = "0.1.0"
