"""Command-line tools that run once, outside training (weight conversion)."""
