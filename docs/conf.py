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
myst_enable_extensions = ['dollarmath', 'amsmath', 'colon_fence', 'deflist']
myst_heading_anchors = 3
source_suffix = {'.md': 'markdown'}
exclude_patterns = ['_build']

# Google-style docstrings, in source order, type hints in the description.
# Every API page names each object it documents in its own directive
# (tests/test_docs.py checks that every public name has one), so no
# directive pulls in members by default: that would document them twice.
napoleon_google_docstring = True
napoleon_numpy_docstring = False
autodoc_member_order = 'bysource'
autodoc_typehints = 'description'
# Types only where the docstring documents the parameter (a NamedTuple's
# fields are its Attributes; listing them again as parameters is noise).
autodoc_typehints_description_target = 'documented_params'
autodoc_default_options = {'show-inheritance': True}
# The library's annotations are strings (``from __future__ import
# annotations``): print its aliases by name instead of expanding them.
autodoc_type_aliases = {
    'AxisName': 'defjax.compress.AxisName',
    'KeyLike': 'defjax.compress.KeyLike',
    'PyTree': 'defjax.compress.PyTree',
}

# Literal blocks in docstrings (``::``) hold recursions, formulas and
# commands, not Python: no highlighting. Fenced blocks name their language.
highlight_language = 'text'

html_theme = 'furo'
html_title = f'defjax {release}'
html_static_path = ['_static']
html_css_files = ['custom.css']


def _drop_type_docstrings(app, what, name, obj, options, lines):
  """A constant without a doc comment would show its type's docstring (a
  dict's or a tuple's): leave it to the value and the page's own text."""
  if what in ('data', 'attribute') and lines and not callable(obj):
    type_doc = type(obj).__doc__ or ''
    if '\n'.join(lines).strip() and '\n'.join(lines).split()[:4] == type_doc.split()[:4]:
      lines.clear()


def setup(app):
  app.connect('autodoc-process-docstring', _drop_type_docstrings)
