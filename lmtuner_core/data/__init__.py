"""Datasets: find, read and check them, analyze them, the default chat template, the sample data."""
