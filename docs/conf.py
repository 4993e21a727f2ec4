"""Sphinx configuration of the defjax documentation (``make docs``)."""

import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # defjax, configs and bench from this checkout

import defjax  # noqa: E402

project = 'defjax'
author = 'the defjax authors'
copyright = '2026, the defjax authors'
release = version = defjax.__version__

extensions = [
    'myst_parser',
    'sphinx.ext.autodoc',
    'sphinx.ext.napoleon',
    'sphinx.ext.mathjax',
    'sphinx.ext.viewcode',
]
myst_enable_extensions = ['dollarmath', 'colon_fence', 'deflist']
myst_heading_anchors = 3
source_suffix = {'.md': 'markdown'}
exclude_patterns = ['_build']

# Google-style docstrings, in source order, type hints in the description.
napoleon_google_docstring = True
napoleon_numpy_docstring = False
autodoc_member_order = 'bysource'
autodoc_typehints = 'description'
autodoc_default_options = {'members': True, 'show-inheritance': True}

html_theme = 'furo'
html_title = f'defjax {release}'
html_static_path = []
