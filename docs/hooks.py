"""MkDocs hooks: the configuration reference generated from the configuration classes, and
the docstrings' Sphinx roles rendered as plain code in the API pages.

The docstrings name other objects the Sphinx way (``:mod:`dtokd.losses```, ``:class:`~x.Y```)
and end a paragraph before a literal block with ``::``; Markdown renders these literally, so
this hook turns ``:role:<code>x</code>`` into ``<code>x</code>`` (``~x.Y`` into ``Y``) and a
paragraph-final ``::`` into ``:``. A page holding :data:`GENERATED` gets the reference in its
place. Listed in ``mkdocs.yml`` under ``hooks``."""

from __future__ import annotations

import re

GENERATED = "<!-- generated: dtokd.train.config.reference_markdown -->"
ROLE = re.compile(r":(?:mod|func|class|meth|attr|data|obj|exc):(?=<code>)")
SHORTENED = re.compile(r"<code>~(?:[\w.]+\.)?(\w+)</code>")


def on_page_markdown(markdown: str, **kwargs) -> str:
    if GENERATED not in markdown:
        return markdown
    from dtokd.train.config import reference_markdown

    return markdown.replace(GENERATED, reference_markdown())


def on_page_content(html: str, **kwargs) -> str:
    html = SHORTENED.sub(r"<code>\1</code>", ROLE.sub("", html))
    return html.replace("::</p>", ":</p>")
