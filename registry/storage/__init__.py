"""The store: where versions, aliases, gate records and signatures live, and how they change.

Primitives: ``backends`` (local directory or S3, one :class:`Backend` contract),
``blobs`` (content-addressed files), ``refs`` (name and ref grammar), ``refwrite``
(create-only and compare-and-swap pointers), ``manifest`` (the version object),
``locking`` and ``failpoints``. On top: ``reader`` (every query, the keys, locks and
the audit log), the writers ``publish`` (push), ``aliases`` (aliases, unbinding) and
``attachments`` (gate records, signatures), and ``store`` (:class:`Store`: the reader
plus the writers, with the backend and audit log kind chosen once). Writers change
the store only through :func:`registry.audit.journal.run_mutation`. This package may
import the foundations (errors, digests, fsutil, stamps, progress), :mod:`registry.audit`
and the record/lineage/signing validators; never maintenance, interop or the CLI.
It re-exports nothing.
"""
