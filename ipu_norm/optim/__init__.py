"""Optimisation: parameter groups, Adaptive Gradient Clipping, schedules."""
