"""Experiments: batch dependence of the norms (batch_dependence) and signal propagation at init (signal_prop).

Run each with `python -m ipu_norm.experiments.<name> --help`.
"""
