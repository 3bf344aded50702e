"""File formats: what merging/ and gate/ import the registry for, with no store involved.

The safetensors header parser (``safetensors_header``, ``dtypes``), PEFT's key and
config rules (``peft_keys``, ``patterns`` over the linear-time ``linear_regex``), the
base-model fingerprint (``fingerprint``), the adapter-vs-base shape check
(``base_check``), and the shared checks for untrusted documents (``fields``,
``strict_json``). Modules here import only :mod:`registry.errors`,
:mod:`registry.digests`, :mod:`registry.progress` and each other -- never the store,
the audit log or the domain modules -- so they can be used on plain directories.
This package re-exports nothing: import from the defining module.
"""
