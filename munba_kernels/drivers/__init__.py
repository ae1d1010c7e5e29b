"""Thin drivers: runnable unlearning experiments built on MUNBaOptimizer."""
