"""Sphinx configuration: python -m sphinx -W --keep-going -b html docs docs/_build/html

The reference pages are generated from the code (autodoc for the Python API,
sphinx-argparse for the command line, ``_ext/mpitrain_docs.py`` for the options
of ``Config``); nothing there is kept by hand.
"""
import importlib.util
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))  # the checkout's mpitrain
sys.path.insert(0, os.path.join(HERE, "_ext"))

import mpitrain  # noqa: E402

project = "mpitrain"
author = "The mpitrain authors"
copyright = "2026, The mpitrain authors"
release = version = mpitrain.__version__

extensions = ["myst_parser", "sphinx.ext.autodoc", "sphinxarg.ext", "mpitrain_docs"]
source_suffix = {".md": "markdown", ".rst": "restructuredtext"}
root_doc = "index"
exclude_patterns = ["_build"]
myst_heading_anchors = 3
myst_enable_extensions = ["colon_fence"]
smartquotes = False  # -- in flags stays two hyphens

autodoc_member_order = "bysource"
autodoc_typehints = "description"
autodoc_default_options = {"members": True, "undoc-members": False}
# The reference builds without torch: mpitrain.torch's signatures name torch's types.
if importlib.util.find_spec("torch") is None:
    autodoc_mock_imports = ["torch"]

html_theme = "furo"
html_title = f"mpitrain {release}"
html_static_path = ["_static"]
