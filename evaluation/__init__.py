"""Evaluation: Spanish report metrics, a rule-based finding and laterality labeler, the ablation."""
