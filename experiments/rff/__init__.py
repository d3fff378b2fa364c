"""rff experiments."""
