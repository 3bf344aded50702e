"""Storage backends: the :class:`~registry.storage.backends.base.Backend` contract, local and S3."""
