"""difflab."""
