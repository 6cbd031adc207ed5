"""The catalog fixture of the daemon's state-machine tests."""
from support.catalogs import cat  # noqa: F401  (a fixture: pytest finds it here)
