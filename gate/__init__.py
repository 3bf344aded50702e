"""adapterkit gate package."""
