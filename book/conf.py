"""Sphinx configuration of the course site (``make book``). ffnlib.book stages the pages next to a copy of this
file and runs sphinx-build; nothing is executed here: the notebooks come with their ci-scale outputs."""

project = "ffnlib: feed-forward layers as key-value memories"
author = "the ffnlib team"
extensions = ["myst_nb", "sphinx-mathjax-offline",  # the package imports under its hyphenated name
              "sphinx.ext.autodoc", "sphinx.ext.autosummary", "sphinx.ext.napoleon"]
myst_enable_extensions = ["dollarmath", "amsmath", "colon_fence"]
myst_heading_anchors = 3
nb_execution_mode = "off"  # pages show the outputs stored at scale="ci"; the site never runs a notebook
nb_ipywidgets_js = {}  # no widget JavaScript from a CDN (ffnlib.book also drops widget outputs)
exclude_patterns = ["_build", "**.ipynb_checkpoints", "_parts.md"]  # _parts.md: included by instructors.md
html_theme = "sphinx_book_theme"
html_title = "ffnlib course"
html_theme_options = {"home_page_in_toc": True, "show_navbar_depth": 2}
html_static_path = []
# The API reference (docs/api.md): autosummary walks the package and writes a page per module from its docstrings;
# _templates/autosummary/module.rst documents each module's members and recurses into its submodules.
templates_path = ["_templates"]
autosummary_generate = True
autosummary_imported_members = False
autodoc_member_order = "bysource"
autodoc_typehints = "description"
autodoc_mock_imports = []
suppress_warnings = ["mystnb.unknown_mime_type", "misc.highlighting_failure"]


def _literal_bars(app, what, name, obj, options, lines):
    """The docstrings write sizes as |m_i| and norms as ||v||; reStructuredText would read |m_i| as a
    substitution. Escape every bar outside ``literals``, so it prints as written."""
    for i, line in enumerate(lines):
        parts = line.split("``")
        lines[i] = "``".join(p.replace("|", "\\|") if j % 2 == 0 else p for j, p in enumerate(parts))


def setup(app):
    app.connect("autodoc-process-docstring", _literal_bars)
