"""Training on Ray Train: SFT and GRPO for the policy, focal + Dice for the segmenter. Imports data and models."""
