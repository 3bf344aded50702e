"""The audit log: every store mutation fully audited or invisible.

``chain`` (entry shape, hashing, checking), the two log kinds behind one protocol
``trail.AuditTrail``: ``log`` (local JSONL + head, under a flock) and ``objects``
(one object per entry on S3); ``journal`` (intent markers: write-ahead, recovery),
``index`` (reading the log back: what explains each visible change) and
``checkpoint`` (signed log heads). Imports the storage primitives (backends,
locking, failpoints) and, for types only, :class:`registry.storage.reader.StoreReader`;
never the store's writers. Re-exports nothing.
"""
