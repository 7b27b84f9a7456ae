"""Scoring: the metrics (Dice, IoU, HD95, bootstrap intervals), optimal-transport label matching, the scoring of a
policy answer, and the checks of its reasoning. One definition each, shared by train (GRPO rewards), eval and serve."""
