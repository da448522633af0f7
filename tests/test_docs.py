"""The docs hold: every link points at a file or heading of the repository, no page names a path outside a
clone, the settings table lists every setting once, and the README's sweep-then-report line reads the folder its
sweep writes."""

from __future__ import annotations

import dataclasses
import re
import shlex
from collections import Counter
from pathlib import Path

import pytest
from conftest import REPO
from helpers.sweeps import folder_of

from cifar_resnet.config import Config

pytestmark = pytest.mark.quick  # seconds in all: part of `pytest -m quick`


DOCS = [REPO / "README.md", REPO / "BENCHMARKS.md", *sorted((REPO / "docs").glob("*.md")),
        *sorted((REPO / "benchmarks" / "results").glob("*/README.md"))]
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def prose(page: Path) -> str:
    """A Markdown page without its fenced code blocks (where `# ...` is a comment, not a heading)."""
    return re.sub(r"^```.*?^```", "", page.read_text(), flags=re.M | re.S)


def anchors(page: Path) -> set[str]:
    """GitHub's anchors of a page's headings: lower case, punctuation dropped, spaces as hyphens, repeats numbered."""
    found, seen = set(), Counter()
    for heading in re.findall(r"^#+ (.+)$", prose(page), flags=re.M):
        slug = re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
        found.add(f"{slug}-{seen[slug]}" if seen[slug] else slug)
        seen[slug] += 1
    return found


@pytest.mark.parametrize("page", DOCS, ids=lambda page: page.relative_to(REPO).as_posix())
def test_every_link_of_the_docs_points_at_a_file_or_heading_of_the_repository(page):
    broken = []
    for target in LINK.findall(prose(page)):
        if re.match(r"[a-z]+:", target):
            continue  # a web address
        path, _, anchor = target.partition("#")
        linked = (page.parent / path).resolve() if path else page
        if not linked.is_relative_to(REPO) or not linked.exists():
            broken.append(f"{target}: no such file in the repository")
        elif anchor and linked.suffix == ".md" and anchor not in anchors(linked):
            broken.append(f"{target}: no such heading in {linked.relative_to(REPO)}")
    assert not broken, broken


def test_the_docs_name_no_path_outside_a_clone_of_the_repository():
    """A user's clone has no folder beside it: the tests' inputs are named by their variables."""
    assert [page.name for page in DOCS if re.search(r"\.\./shared|/work/", page.read_text())] == []


def test_the_readmes_report_command_reads_the_folder_its_sweep_command_writes():
    """README's main job is `cifar-resnet sweep FILE ... && cifar-resnet report FOLDER`: FOLDER must be FILE's."""
    lines = [line for line in (REPO / "README.md").read_text().splitlines()
             if "cifar-resnet sweep " in line and "cifar-resnet report " in line]
    assert lines
    for line in lines:
        sweep_part, report_part = line.split("&&")
        words = shlex.split(sweep_part)
        sweep_file = REPO / words[words.index("sweep") + 1]
        overrides = [words[i + 1] for i, word in enumerate(words) if word == "--set"]
        assert shlex.split(report_part)[-1] == folder_of(sweep_file, *overrides).as_posix(), line


def test_the_docs_settings_table_lists_every_setting_once():
    page = (Path(__file__).resolve().parents[1] / "docs" / "settings.md").read_text()
    table = page.split("<!-- settings-table -->")[1].split("<!-- /settings-table -->")[0]
    first_cells = [line.split("|")[1] for line in table.splitlines() if line.startswith("| `")]
    listed = [name for cell in first_cells for name in re.findall(r"`(\w+)`", cell)]
    assert sorted(listed) == sorted(f.name for f in dataclasses.fields(Config))
