"""Verdict: tolerance expressions, gates, built-in defaults, spec files, the noise floor, and judging a saved run."""
