"""Evaluation: metrics, label matching, reports."""
