"""Evaluation: metrics against references and exact ground truth, sweeps, tables and plots."""
