"""vfiomig: model, drive and test live migration with VFIO passthrough devices."""

__version__ = "0.1.0"
