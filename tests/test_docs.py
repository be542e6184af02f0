"""The documentation builds with Sphinx, warnings as errors (as ``make docs``), and has the pages the README
promises: one per algorithm with the same sections, the guides and the changelog."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
ALGORITHM_PAGES = ["hanq", "ssaq", "crossq_wn", "preqn", "stac"]
SECTIONS = ["## Notes", "## Can I use?", "## Example", "## Results", "## Parameters", "policies"]


@pytest.mark.skipif(not DOCS.is_dir(), reason="docs/ is not in this copy of the sources")
def test_every_algorithm_page_has_the_same_sections():
    from sb3_hanq.zoo import ZOO_KEYS

    assert sorted(ALGORITHM_PAGES) == sorted(ZOO_KEYS)  # one page per zoo key / subpackage
    for name in ALGORITHM_PAGES:
        text = (DOCS / "modules" / f"{name}.md").read_text()
        for section in SECTIONS:
            assert section in text, f"docs/modules/{name}.md lacks {section!r}"
        assert "```python" in text and "sb3-hanq-zoo train --algo" in text


@pytest.mark.skipif(not DOCS.is_dir(), reason="docs/ is not in this copy of the sources")
@pytest.mark.skipif(
    importlib.util.find_spec("sphinx") is None or importlib.util.find_spec("myst_parser") is None,
    reason="needs the 'docs' extra (sphinx, myst-parser): pip install -e '.[docs]'",
)
@pytest.mark.timeout(120)
def test_docs_build_without_warnings(tmp_path):
    from sphinx.cmd.build import build_main

    # -W: warnings are errors; -E: read every page; -q: only warnings
    status = build_main(["-W", "-E", "-q", "-b", "html", "-d", str(tmp_path / "doctrees"), str(DOCS), str(tmp_path)])
    assert status == 0, "sphinx-build -W failed: see the warnings above"
    for page in [
        "index",
        "guide/install",
        "guide/offline",
        "guide/hyperadam",
        "guide/ntk",
        "guide/zoo",
        "guide/population",
        "guide/examples",
        "misc/results",
        "misc/reliability",
        "misc/changelog",
    ] + [f"modules/{name}" for name in ALGORITHM_PAGES]:
        assert (tmp_path / f"{page}.html").is_file(), page
    hanq = (tmp_path / "modules" / "hanq.html").read_text()
    assert 'id="sb3_hanq.hanq.HANQ"' in hanq  # autodoc rendered the class and its parameters
    assert "hyper_lr" in hanq
    assert "Release 0.1.0" in (tmp_path / "misc" / "changelog.html").read_text()  # CHANGELOG.md included
