"""mkdocs hook (mkdocs.yml `hooks:`): the benchmarks page gets bench/render.py's tables at build time,
and the backbones page the newest backbone sweep's.

The page holds the marker below where the rendered results go, so every bench/results/*.json,
including ones added later, appears on the site without anyone copying a figure.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

MARKER = "<!-- bench/results rendered here -->"
# The backbones page: the newest backbone sweep's table, linked to its section of the benchmarks page.
SWEEP_MARKER = "<!-- bench backbone sweep rendered here -->"
REPO = Path(__file__).resolve().parent.parent


def on_page_markdown(markdown: str, page: Any, **_: Any) -> str:
    if MARKER not in markdown and SWEEP_MARKER not in markdown:
        return markdown
    if str(REPO) not in sys.path:  # `mkdocs build` (a script) does not put the checkout on sys.path
        sys.path.insert(0, str(REPO))
    from bench.render import backbone_sweep_table, render

    if SWEEP_MARKER in markdown:
        markdown = markdown.replace(SWEEP_MARKER, backbone_sweep_table(link="benchmarks.md#{stem}"))
    return markdown.replace(MARKER, render()) if MARKER in markdown else markdown
