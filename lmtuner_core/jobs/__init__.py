"""Jobs: check, queue, start and follow training jobs; the run folder; the supervisor; torchrun and Ray."""
