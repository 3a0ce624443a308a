"""The repository stands alone: every file path its code, configs and documents cite exists in it, and no
text or file name speaks of issue numbers or of documents outside the repository."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TOPS = ("src", "benchmarks", "docs", "configs", "ablations", "tests", ".ci")
# a path ends where no path character follows (a pattern such as spatial_mamba_{t,s,b}.yaml is no citation)
CITED = re.compile(r"(?<![\w/.$-])((?:src|benchmarks|docs|configs|ablations|tests)/[\w./-]*\w)(?![\w{<*/-]|\.\w)")
OUTSIDE = re.compile(r"\.\./shared|\bissue[ _-]?#?\d+|ARCHITECTURE\.md|KERNELS\.md", re.IGNORECASE)


def repo_texts() -> dict[Path, str]:
    """README, main.py, pyproject.toml and the sources, scripts, configs and documents of the project's folders."""
    paths = [ROOT / name for name in ("README.md", "main.py", "pyproject.toml")]
    for top in TOPS:
        paths += [p for p in (ROOT / top).rglob("*") if p.is_file() and "__pycache__" not in p.parts
                  and (p.suffix in {".py", ".md", ".sh", ".yaml", ".toml"} or p.parent.name == ".ci")]
    return {p: p.read_text(errors="replace") for p in paths if p.name != "test_docs.py"}


def dangling(text: str, root: Path) -> list[str]:
    """Paths under the project's folders that `text` cites and `root` does not hold."""
    return sorted({m.group(1) for m in CITED.finditer(text) if not (root / m.group(1)).exists()})


def test_cited_files_exist():
    missing = {str(p.relative_to(ROOT)): refs for p, text in repo_texts().items() if (refs := dangling(text, ROOT))}
    assert missing == {}


def test_no_issue_numbers_or_outside_documents():
    found = {str(p.relative_to(ROOT)): OUTSIDE.findall(text) for p, text in repo_texts().items() if OUTSIDE.search(text)}
    assert found == {}
    assert not [p for top in TOPS for p in (ROOT / top).rglob("*issue*")]


def test_the_checks_above_can_fail(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "design.md").write_text("")
    text = "see docs/design.md, docs/missing.md. And configs/imagenet/spatial_mamba_{t,s,b}.yaml (a pattern)"
    assert dangling(text, tmp_path) == ["docs/missing.md"]
    number, outside = "issue " + "15", ".." + "/shared/STYLE.md"  # built here: the repo's own text holds neither
    assert OUTSIDE.search(f"as {number} asks") and OUTSIDE.search(f"read {outside}")
    assert not OUTSIDE.search("an issue with the tile sizes")
