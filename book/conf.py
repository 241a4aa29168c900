"""Sphinx configuration of the course site (``make book``). ffnlib.book stages the pages next to a copy of this
file and runs sphinx-build; nothing is executed here: the notebooks come with their ci-scale outputs."""

project = "ffnlib: feed-forward layers as key-value memories"
author = "the ffnlib team"
extensions = ["myst_nb", "sphinx-mathjax-offline"]  # the package imports under its hyphenated name
myst_enable_extensions = ["dollarmath", "amsmath", "colon_fence"]
myst_heading_anchors = 3
nb_execution_mode = "off"  # pages show the outputs stored at scale="ci"; the site never runs a notebook
nb_ipywidgets_js = {}  # no widget JavaScript from a CDN (ffnlib.book also drops widget outputs)
exclude_patterns = ["_build", "**.ipynb_checkpoints", "_parts.md"]  # _parts.md: included by instructors.md
html_theme = "sphinx_book_theme"
html_title = "ffnlib course"
html_theme_options = {"home_page_in_toc": True, "show_navbar_depth": 2}
html_static_path = []
suppress_warnings = ["mystnb.unknown_mime_type", "misc.highlighting_failure"]
