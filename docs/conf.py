"""Sphinx configuration: Markdown pages (MyST) and an API reference from the docstrings (autodoc).

Built by ``make docs`` as ``sphinx-build -W --keep-going -n -b html docs docs/_build/html``:
every warning (a broken cross-reference, a page outside the toctree, a docstring that does not
render) fails the build.
"""

import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # the library is imported from the clone, as the tests do
# autodoc imports adpsgd_jax (and with it jax): keep it on the CPU, quietly.
os.environ.setdefault("JAX_PLATFORMS", "cpu")

project = "adpsgd_jax"
author = "adpsgd_jax authors"
copyright = "adpsgd_jax authors"
release = version = "0.1.0"

extensions = [
    "myst_parser",
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
]

source_suffix = {".md": "markdown", ".rst": "restructuredtext"}
root_doc = "index"
exclude_patterns = ["_build", "requirements.txt", "README.md"]

# MyST: headings get anchors (page.md#a-heading links resolve), $...$ maths stays literal text.
myst_heading_anchors = 3
myst_enable_extensions = ["deflist"]

# autodoc: members in source order, signatures with their annotations as written.
autodoc_member_order = "bysource"
autodoc_typehints = "signature"
autodoc_preserve_defaults = True
autodoc_default_options = {"members": True, "show-inheritance": False}
autosummary_generate = False
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_ivar = True  # "Attributes:" sections as fields of their class, not a second description of each


def _skip_namedtuple_fields(app, what, name, obj, skip, options):
    """A NamedTuple's fields are described in its docstring; skip the generated "Alias for field number N"."""
    doc = getattr(obj, "__doc__", None) or ""
    if what == "class" and doc.startswith("Alias for field number"):
        return True
    return None


# study.md and study_vs_*.md are written by experiments/study_report.py without a title of its own; the site gives it one.
GENERATED_TITLES = {"study": "The schedule study: tables against CPSGD",
                    "study_vs_lr_proportional": "The schedule study: tables against lr_proportional",
                    "study_vs_adpsgd": "The schedule study: tables against ADPSGD"}


def _title_generated_pages(app, docname, source):
    title = GENERATED_TITLES.get(docname)
    if title and not source[0].lstrip().startswith("# "):
        source[0] = f"# {title}\n\n" + source[0]


def setup(app):
    app.connect("autodoc-skip-member", _skip_namedtuple_fields)
    app.connect("source-read", _title_generated_pages)

# Names from other libraries (no network for intersphinx in CI): not cross-referenced.
nitpick_ignore_regex = [
    (r"py:.*", r"(jax|jaxlib|optax|chex|numpy|np|jnp|typing|collections|flax)(\..*)?"),
    (r"py:class", r"(Array|ArrayLike|PyTree|Any|Callable|Optional|Sequence|Union|NamedTuple|Mesh|NamedSharding|P)"),
    (r"py:class", r"(int|float|bool|str|tuple|dict|list|None|object|type)"),
]

html_theme = "furo"
html_title = "adpsgd_jax"
html_static_path = []
