"""The result report of a completed job: the retention probe (probe.py) and its scoring."""
