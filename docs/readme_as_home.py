"""mkdocs hook: README.md is the site's home page, so the tour is written once.

The README links to the pages as GitHub shows them (`docs/port.md`); on the site the
pages sit beside the home page (`port.md`).
"""

from __future__ import annotations

from pathlib import Path

from mkdocs.structure.files import File, Files


def on_files(files: Files, config) -> Files:
    readme = Path(config.config_file_path).parent / "README.md"
    text = readme.read_text(encoding="utf-8").replace("](docs/", "](")
    files.append(File.generated(config, "index.md", content=text))
    return files
