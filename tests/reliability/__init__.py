"""The reliability suite (issue 9): kill -9 and full-disk faults, bad input, security. `make reliability` runs all."""
