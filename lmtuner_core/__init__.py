"""lmtuner's engine: config, data, training recipe, jobs. Importing it must stay cheap (no torch)."""

__version__ = "0.1.0"
