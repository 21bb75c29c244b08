"""The documents a newcomer reads: every relative link resolves inside the repository, every command has its
README section, and nothing points at files a reader of the repository cannot open."""
import argparse
import os
import re
from pathlib import Path

import pytest

from vitkit.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
DOCUMENTS = [ROOT / "README.md", ROOT / "BENCHMARKS.md", *sorted((ROOT / "docs").glob("*.md"))]
# Markdown links and images: [text](target) and ![alt](target).
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
# Folders that are not the repository's own text: environments, build output, data, runs.
NOT_SOURCE = {".git", ".venv", ".venv-oldest-torch", "build", "data", "outputs", "runs", "__pycache__",
              ".pytest_cache", "fixtures", "results"}
TEXT_SUFFIXES = {".py", ".md", ".yml", ".yaml", ".toml", ".sh", ".c", ".cfg", ".txt", ""}


def _anchor(heading: str) -> str:
    """GitHub's anchor for a Markdown heading: lower case, punctuation dropped, spaces as hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def _anchors(document: Path) -> set[str]:
    text = re.sub(r"```.*?```", "", document.read_text(), flags=re.S)  # no headings inside code blocks
    return {_anchor(line.lstrip("#")) for line in text.splitlines() if line.startswith("#")}


def _links(document: Path) -> list[str]:
    text = re.sub(r"```.*?```", "", document.read_text(), flags=re.S)
    return LINK.findall(text)


def test_the_documents_exist_and_the_readme_stays_a_short_how_to():
    names = {path.relative_to(ROOT).as_posix() for path in DOCUMENTS}
    assert {"README.md", "BENCHMARKS.md", "docs/data-pipeline.md", "docs/weight-formats.md",
            "docs/differences-from-mindspore.md", "docs/design.md"} <= names
    assert len((ROOT / "README.md").read_text().splitlines()) < 300


@pytest.mark.parametrize("document", DOCUMENTS, ids=lambda path: path.relative_to(ROOT).as_posix())
def test_every_relative_link_resolves_to_a_file_in_the_repository(document):
    links = _links(document)
    problems = []
    for link in links:
        if re.match(r"[a-z][a-z0-9+.-]*:", link):  # http:, https:, mailto: are not files
            continue
        target, _, anchor = link.partition("#")
        path = (document.parent / target).resolve() if target else document
        if not path.is_relative_to(ROOT):
            problems.append(f"{link}: outside the repository")
        elif not path.is_file():
            problems.append(f"{link}: no such file")
        elif anchor and path.suffix == ".md" and anchor not in _anchors(path):
            problems.append(f"{link}: no heading #{anchor} in {path.relative_to(ROOT)}")
    assert not problems, f"{document.name}: " + "; ".join(problems)


def test_the_links_checked_include_the_readmes_images_and_docs():
    links = _links(ROOT / "README.md")
    assert "docs/images/demo_curves.png" in links and "docs/weight-formats.md" in links


def test_every_command_has_a_readme_section():
    parser = build_parser()
    (subcommands,) = [action for action in parser._actions if isinstance(action, argparse._SubParsersAction)]
    headings = {line.strip() for line in (ROOT / "README.md").read_text().splitlines() if line.startswith("### ")}
    missing = sorted(name for name in subcommands.choices if f"### vitkit {name}" not in headings)
    assert not missing, f"README.md has no '### vitkit NAME' section for: {', '.join(missing)}"


def test_no_file_points_outside_the_repository():
    # Spelled in pieces so that this file does not match itself.
    forbidden = ["../" + "shared", "seed-" + "behaviour", "seed-" + "behavior"]
    hits = []
    for folder, subfolders, files in os.walk(ROOT):
        subfolders[:] = [name for name in subfolders if name not in NOT_SOURCE and not name.endswith(".egg-info")]
        for name in files:
            path = Path(folder) / name
            if path.suffix not in TEXT_SUFFIXES or path.stat().st_size > 1_000_000:
                continue
            text = path.read_text(errors="replace")
            hits += [f"{path.relative_to(ROOT)}: {word}" for word in forbidden if word in text]
    assert not hits, "; ".join(hits)
