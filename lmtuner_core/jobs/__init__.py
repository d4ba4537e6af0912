"""Jobs: check, record, hand over and follow training jobs — the launcher seam (launcher.py) and its backends (this
machine's queue, supervisor and torchrun; Ray), the job store, progress."""
