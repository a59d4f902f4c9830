"""The aproxy test suite."""
