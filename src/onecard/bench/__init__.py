"""Measurement: perplexity protocol, side-by-side benchmark tables, result files."""
