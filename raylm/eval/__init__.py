"""Evaluation: task files, scoring rules, metrics with intervals, decontamination."""
