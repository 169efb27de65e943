"""Dataset format, demo data and preprocessing."""
