"""Winning the accuracy back after a rewrite: calibration data, data-aware weight fitting,
BatchNorm re-estimation, knowledge distillation (optionally data-parallel under torchrun), and
fidelity measured on held-out samples.

``batches`` defines what every part iterates over; ``device`` picks where the work runs.
"""
