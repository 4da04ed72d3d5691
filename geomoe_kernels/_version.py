__version__ = "0.1.0"  # as in pyproject.toml; the self-check keys its cache on it
