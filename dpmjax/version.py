"""The version of dpmjax, defined once: the installed distribution's, from its metadata.

``pyproject.toml`` holds the number; installing the package (also ``pip install -e .``) writes it
into the distribution's metadata, where :data:`__version__` reads it. A source tree on the path
without being installed has no metadata: its ``pyproject.toml`` gives the number instead, and
without one either the version is ``"0+unknown"``.
"""

from __future__ import annotations

import re
from importlib import metadata
from pathlib import Path

DISTRIBUTION = "dpmjax"
UNKNOWN = "0+unknown"
SOURCE_PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"


def source_tree_version(pyproject: Path = SOURCE_PYPROJECT) -> str:
    """The ``version`` of the ``[project]`` table of ``pyproject`` when that project is dpmjax, else
    :data:`UNKNOWN` (no such file, another project, no static version)."""
    try:
        text = pyproject.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return UNKNOWN
    table = re.search(r"^\[project\][ \t]*$(.*?)(?=^\[|\Z)", text, re.M | re.S)
    fields = dict(re.findall(r'^(name|version)\s*=\s*"([^"]*)"', table.group(1), re.M)) if table else {}
    return fields["version"] if fields.get("name") == DISTRIBUTION and fields.get("version") else UNKNOWN


def package_version() -> str:
    """The installed distribution's version; from a source tree without installation metadata,
    :func:`source_tree_version`."""
    try:
        return metadata.version(DISTRIBUTION)
    except metadata.PackageNotFoundError:
        return source_tree_version()


__version__ = package_version()
