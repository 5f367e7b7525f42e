"""raypar's version: one place, read by the package, the build and what raypar writes (job dirs, images)."""

__version__ = "0.1.0"
