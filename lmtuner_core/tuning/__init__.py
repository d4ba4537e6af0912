"""Budgeted sweeps over the training recipe on Ray Tune (tune_config / `lmtuner tune`)."""
