"""vfiomig.host."""
