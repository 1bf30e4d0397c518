"""sparserl."""
