"""pytest plugins of the suite: the modules that define fixtures.

Each is listed in ``tests/conftest.py``'s ``pytest_plugins``, so a test asks for a
fixture by naming it as an argument; no test module imports a fixture (an imported
fixture is a second registration, and a session-scoped one would start twice). Plain
functions of these modules (``is_s3``, ``remount_read_only``...) are imported by name.
"""
