"""Evaluation: the eval job (plan, workers, driver), its tables and report."""
