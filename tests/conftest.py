"""Session-wide test plumbing: the fixture plugins and how pytest-xdist splits the suite.

* Fixtures live in the plugins of :data:`pytest_plugins` (``tests/plugins/``): the S3
  servers and store locations (:mod:`tests.plugins.s3`), tmpfs mounts
  (:mod:`tests.plugins.mounts`), the unload tests' saved base
  (:mod:`tests.plugins.unload`) and the merge tests' stores and adapter pairs
  (:mod:`tests.plugins.merge`). A test asks for a fixture by naming it; plain helpers
  (builders, CLI runners) are in ``tests/support/`` and are imported by name.
  :func:`tests.plugins.s3.s3_servers` is session-scoped: one instance (one moto, one
  SeaweedFS, each started on first use) serves every module of a pytest process, i.e.
  of each xdist worker.
* Under ``--dist loadscope`` (what ``make test`` runs) a whole module goes to one
  worker, so each module-scoped fixture (a trained adapter, a saved model, a Hub
  cache) is built once per run rather than once per worker; the modules in
  :data:`SAME_WORKER`, and every module that calls ``tests.support.gate.world()`` (a
  process-wide world: two adapters trained for 150 steps each), go to the same
  worker as one unit, so that world is built once per run.
  Long modules without module-scoped fixtures (:data:`SPLIT_PER_TEST`: every backend
  times every crash point) are split test by test instead, so no single module
  becomes the run's critical path.
* Order: pytest-randomly shuffles modules and the tests inside them. Each run prints
  its seed (``Using --randomly-seed=N``, and ``make test`` prints it first); replay an
  order with ``--randomly-seed=N`` (``make test SEED=N``).
"""

from __future__ import annotations

from typing import Any

import pytest

pytest_plugins = ["tests.plugins.s3", "tests.plugins.mounts", "tests.plugins.unload",
                  "tests.plugins.merge"]

SAME_WORKER = {
    "tests/functional/test_gate.py": "gate-world",
    "tests/functional/test_decoding.py": "gate-world",
    "tests/functional/test_promote.py": "gate-world",
    "tests/functional/test_gate_derived.py": "gate-world",
    "tests/functional/test_custody_default_policy.py": "gate-world",
}

SPLIT_PER_TEST = {
    "tests/functional/test_failpoints.py",
    "tests/functional/test_backends.py",
    "tests/functional/test_signing_store.py",
}


@pytest.hookimpl(optionalhook=True)  # a hook of pytest-xdist: unknown without it
def pytest_xdist_make_scheduler(config: pytest.Config, log: Any) -> Any:
    """Under ``--dist loadscope``: a work unit per module, :data:`SAME_WORKER` group, or
    test of a :data:`SPLIT_PER_TEST` module."""
    if config.getoption("dist", None) != "loadscope":
        return None  # xdist's own scheduler for every other mode
    from xdist.scheduler import LoadScopeScheduling

    groups: dict[str, str] = {}

    def group_of(module: str) -> str:
        """The work unit of a module: its :data:`SAME_WORKER` group, ``gate-world`` for
        any module that calls ``tests.support.gate.world()``, or the module itself."""
        if module not in groups:
            try:
                text = (config.rootpath / module).read_text(encoding="utf-8")
            except OSError:
                text = ""
            uses_world = "tests.support.gate" in text and "world()" in text
            groups[module] = SAME_WORKER.get(module, "gate-world" if uses_world else module)
        return groups[module]

    class ModuleScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            module = nodeid.split("::", 1)[0]
            return nodeid if module in SPLIT_PER_TEST else group_of(module)

    return ModuleScheduling(config, log)
