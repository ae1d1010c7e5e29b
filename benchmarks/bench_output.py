"""The one way every benchmark script reports: the Markdown table on stdout, optional files."""

from __future__ import annotations

import json
from pathlib import Path


def emit(result, table: str, json_path: str | None, markdown_path: str | None) -> None:
    """Print ``table``; write ``result`` as JSON and ``table`` as Markdown where paths are given."""
    print(table)
    if json_path:
        Path(json_path).write_text(json.dumps(result, indent=2))
    if markdown_path:
        Path(markdown_path).write_text(table)
