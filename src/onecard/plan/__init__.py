"""Predict memory and speed for a model x card x job, and propose the settings that fit (issue 9)."""
