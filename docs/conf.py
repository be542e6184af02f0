"""Sphinx configuration of the sb3-hanq documentation (Sphinx + MyST + autodoc, like sb3-contrib's).

Build: ``make docs`` (``sphinx-build -W``: every warning is an error).
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.abspath(".."))  # document the checkout, installed or not

from sb3_hanq.version import __version__  # noqa: E402

project = "sb3-hanq"
author = "The sb3-hanq maintainers"
copyright = "2026, The sb3-hanq maintainers"
version = release = __version__

extensions = [
    "myst_parser",
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.viewcode",
]
source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
root_doc = "index"
exclude_patterns = ["_build"]

myst_enable_extensions = ["dollarmath", "colon_fence"]
myst_heading_anchors = 3

autodoc_member_order = "bysource"
autodoc_typehints = "description"
autodoc_default_options = {"show-inheritance": True}
napoleon_google_docstring = False  # the docstrings use Sphinx's :param: fields, as SB3's

try:
    import sphinx_rtd_theme  # noqa: F401

    html_theme = "sphinx_rtd_theme"
except ImportError:  # the `docs` extra installs it; fall back to Sphinx's default theme
    html_theme = "alabaster"
html_title = f"sb3-hanq {release}"
