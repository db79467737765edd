"""Speed measurements of the scorer (not tests): python -m benchmarks.run [--quick]."""
