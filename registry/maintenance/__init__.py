"""Store maintenance: ``integrity.verify`` (re-hash and cross-check everything) and
``collection.gc`` (reclaim what nothing references). The top layer of the registry:
it may import the store, the audit log and the formats; nothing in the registry
imports it. Re-exports nothing.
"""
