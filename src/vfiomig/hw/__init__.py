"""vfiomig.hw."""
