"""vfiomig.kernel."""
