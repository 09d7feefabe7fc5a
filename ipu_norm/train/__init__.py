"""Training loop utilities."""
