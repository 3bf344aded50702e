"""Session-wide fixtures, registered once for every test module.

:func:`tests.backend_fixtures.s3_servers` is session-scoped: registered here, one
instance (one moto, one SeaweedFS, started on first use) serves every module of a
pytest process, i.e. of each xdist worker. Test modules import the function-scoped
fixtures they use (``store_location``...) from :mod:`tests.backend_fixtures` as before.

Each run prints the pytest-randomly seed in its header (``Using --randomly-seed=N``);
rerun a failure in the same order with ``-p randomly -p "randomly_seed=N"`` or
``-p randomly --randomly-seed=N``.
"""

from tests.backend_fixtures import s3_servers  # noqa: F401
