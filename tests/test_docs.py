"""The documentation stays inside the repository and in step with the code: relative links and
their #anchors resolve, nothing points outside the checkout, the section names that code comments
cite exist in docs/method.md, and the README's methods table lists exactly the registered methods."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"\]\(([^)\s]+)\)")


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def headings(path: Path) -> list[str]:
    out, fenced = [], False
    for line in path.read_text().splitlines():
        if line.startswith("```"):
            fenced = not fenced
        elif not fenced and line.startswith("#"):
            out.append(line.lstrip("#").strip())
    return out


def test_slug_follows_github():
    assert slug("Rectified flow (Stable Diffusion 3)") == "rectified-flow-stable-diffusion-3"
    assert slug("Forget loss: the surrogate target") == "forget-loss-the-surrogate-target"


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_relative_links_resolve(doc: Path):
    broken = []
    for link in LINK.findall(doc.read_text()):
        if re.match(r"[a-z]+:", link):  # http:, https:, mailto:
            continue
        path, _, anchor = link.partition("#")
        target = (doc.parent / path).resolve() if path else doc
        if ROOT not in target.parents and target != ROOT:
            broken.append(f"{link}: outside the repository")
        elif not target.exists():
            broken.append(f"{link}: no such file")
        elif anchor and target.suffix == ".md" and anchor not in {slug(h) for h in headings(target)}:
            broken.append(f"{link}: no heading with anchor #{anchor} in {target.name}")
    assert not broken, f"{doc.name}: " + "; ".join(broken)


# A folder beside the checkout and the notes file it held, which users who clone the repo never have
# (spelled in pieces so that this file does not name them itself).
OUTSIDE = ("../" + "shared", "METHOD" + ".md")


def test_nothing_points_outside_the_repository():
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    offenders = []
    for name in tracked:
        path = ROOT / name
        if path.suffix not in {".py", ".md", ".yaml", ".yml", ".toml", ".txt", ".cfg"} or not path.is_file():
            continue
        text = path.read_text(errors="ignore")
        if any(p in text for p in OUTSIDE):
            offenders.append(name)
    assert not offenders, f"these files point outside the repository (use docs/method.md): {offenders}"


def test_sections_cited_by_code_exist():
    """A comment like `docs/method.md "How the result is judged"` names a heading that must exist
    ("..." in a cited name stands for any words)."""
    titles = headings(ROOT / "docs" / "method.md")
    cited = []
    for path in sorted((ROOT / "ray_unlearn").rglob("*.py")):
        for line in path.read_text().splitlines():
            if "docs/method.md" in line:
                cited += [(path.name, name) for name in re.findall(r'"([^"]{4,})"', line.split("docs/method.md", 1)[1])]
    assert cited, "no code comment cites a docs/method.md section by name any more: update this test"
    missing = []
    for where, name in cited:
        pattern = re.compile(".*".join(re.escape(part.strip()) for part in name.split("...")), re.IGNORECASE)
        if not any(pattern.fullmatch(t) or pattern.search(t) for t in titles):
            missing.append(f"{where}: {name!r}")
    assert not missing, f"sections cited in comments but absent from docs/method.md: {missing}"


def test_readme_methods_table_lists_every_method():
    from ray_unlearn.methods import METHODS

    readme = (ROOT / "README.md").read_text()
    table = readme.split("## Methods", 1)[1].split("\n## ", 1)[0]
    rows = re.findall(r"^\| `([a-z0-9_]+)`", table, re.MULTILINE)
    assert sorted(rows) == sorted(METHODS), f"README methods table {rows} vs METHODS {sorted(METHODS)}"


def test_readme_commands_are_make_targets():
    makefile = (ROOT / "Makefile").read_text()
    readme = (ROOT / "README.md").read_text()
    for target in ("demo", "test"):
        assert f"make {target}" in readme
        assert re.search(rf"^{target}:", makefile, re.MULTILINE), f"Makefile has no '{target}' target"
