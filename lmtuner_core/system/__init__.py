"""Operating-system helpers that jobs and serving both use (processes and their groups, ports, log tails, the
SQLite table base), so neither imports the other. Stdlib and psutil only."""
