"""Kiln's built-in plugins, one file per model family, registered as entry points in pyproject.toml."""
