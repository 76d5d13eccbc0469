"""Training: synthetic data, member training, second stage, bundle export."""
