"""adapterkit merging package."""
