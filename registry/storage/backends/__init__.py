"""Storage backends: the ``Backend`` contract (``base``), local and S3, chosen by ``select``.

Re-exports nothing, so ``local`` and ``s3`` import the contract without importing
each other through this package.
"""
