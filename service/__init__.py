"""memedit's service side: the API, the ledger, the queue, settings and the CLI.

:data:`VERSION` is the installed package's version (pyproject.toml is its one source);
versions record it as their code version.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    VERSION = version("memedit")
except PackageNotFoundError:  # a checkout on sys.path without an install
    VERSION = "0.0.0+unknown"
