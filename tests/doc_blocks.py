"""The bash blocks of the docs that tests run as a user copies them, each found by the marker
`<!-- test: NAME -->` on the line above it, so a block can move within its page or be reworded
around without the test losing it."""

from __future__ import annotations

import re

from tests.projects import ROOT


def doc_block(page: str, name: str) -> str:
    """The bash block marked `name` in docs/`page`."""
    text = (ROOT / "docs" / page).read_text()
    found = re.findall(rf"^<!-- test: {re.escape(name)} -->\n```bash\n(.*?)```", text, re.MULTILINE | re.DOTALL)
    if len(found) != 1:
        raise LookupError(f"docs/{page} has {len(found)} bash blocks marked <!-- test: {name} -->, not 1")
    return found[0]
