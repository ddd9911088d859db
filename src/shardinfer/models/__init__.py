"""Model directories: what a model says of itself, and the tiny test model."""
