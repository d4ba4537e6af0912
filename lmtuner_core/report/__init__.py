"""The result report of a job: base vs tuned on held-out rows, the retention probe, and advice for the next run."""
