"""Make ``kla_tl.schedules`` and ``kla_tl.autotune`` importable from a source checkout that is not installed.

In the repository the two packages live at the top level (``schedules/``, ``autotune/``) and pyproject.toml maps them
into the package (``package-dir``), so a wheel ships them as ``kla_tl/schedules/`` and ``kla_tl/autotune/`` and an
editable install maps them with setuptools' own finder. Neither applies to a bare checkout on ``PYTHONPATH``: this
module installs a finder for exactly those two names, active only when ``kla_tl/`` sits in a checkout (a
``pyproject.toml`` beside it) and has no such subpackage of its own. Nothing else becomes importable.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import os
import sys

#: subpackage of kla_tl -> directory at the repository top (the pyproject.toml package-dir mapping)
MAPPED = {"kla_tl.schedules": "schedules", "kla_tl.autotune": "autotune"}


class _CheckoutFinder(importlib.abc.MetaPathFinder):
    """Finds the mapped subpackages in the checkout; every other name is left to the regular finders."""

    def __init__(self, dirs: dict):
        self.dirs = dirs  # full module name -> package directory

    def find_spec(self, fullname, path=None, target=None):
        pkg_dir = self.dirs.get(fullname)
        if pkg_dir is None:
            return None
        return importlib.util.spec_from_file_location(fullname, os.path.join(pkg_dir, "__init__.py"),
                                                      submodule_search_locations=[pkg_dir])


def install() -> None:
    """Register the finder when running from a checkout (idempotent; cheap: a few stat calls)."""
    if any(isinstance(f, _CheckoutFinder) for f in sys.meta_path):
        return
    here = os.path.dirname(os.path.abspath(__file__))
    root = os.path.dirname(here)
    if not os.path.isfile(os.path.join(root, "pyproject.toml")):
        return  # installed: the wheel holds kla_tl/schedules and kla_tl/autotune
    dirs = {}
    for name, top in MAPPED.items():
        own = os.path.join(here, name.rpartition(".")[2])
        pkg_dir = os.path.join(root, top)
        if not os.path.isdir(own) and os.path.isfile(os.path.join(pkg_dir, "__init__.py")):
            dirs[name] = pkg_dir
    if dirs:
        # appended: an editable install's finder (same directories) or a real subpackage still wins
        sys.meta_path.append(_CheckoutFinder(dirs))
