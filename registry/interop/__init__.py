"""Interop with other registries: the Hugging Face Hub (``hub_refs``: names and errors;
``hub``: pull into the store through :func:`registry.add.add_adapter`, push out through
:func:`registry.export.export`). huggingface_hub is imported inside functions only.
"""
