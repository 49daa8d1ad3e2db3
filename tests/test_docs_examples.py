"""The documentation is tested: every example in README.md and docs/*.md runs and prints what the page shows.

How a page marks its fenced blocks (docs/contributing.md says the same for writers):

- Every fence carries a language: `python` and `bash` blocks are examples, `text` blocks are output or plain
  text, `json` / `jinja` / `yaml` / `toml` are shown only.
- An example runs unless the HTML comment on the line right before its fence says `<!-- not-run: REASON -->`
  (a reason is required: the weights it needs, the hours it trains; everything after `not-run:` is the reason).
- `<!-- slow -->` puts an example in the `slow` tier; bash blocks are always slow (each starts Python processes).
- `<!-- continues -->` before a python block runs the page's previous python blocks of the chain first, in one
  namespace, so a page can build an example up in steps. Directives combine with `;` (`<!-- slow; continues -->`).
- A `text` block that follows an example with only blank lines between is its expected output (stdout only): it
  must equal what the example prints, line by line with trailing spaces ignored, after the numbers that depend on
  timing (followed by `tokens/s`, `tok/s`, `ms` or `s`) are replaced by a placeholder on both sides.

Python blocks run in this process (a fresh namespace, the repository root as working directory, stdout captured);
bash blocks run in `bash -eo pipefail` with the repository root as working directory, this interpreter's bin folder
first on PATH and OMP_NUM_THREADS=1. Lines of a bash block that start with `pip install` are skipped: the package
and its extras are installed where the tests run, and the tests must not change the environment.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

import dlm_generation

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
PAGES = [ROOT / "README.md", *sorted(DOCS.glob("*.md"))]
RUN_LANGUAGES = {"python", "bash"}
SHOWN_LANGUAGES = {"text", "json", "jinja", "yaml", "toml"}
DIRECTIVES = {"slow", "continues"}
FENCE = re.compile(r"^```(\S*)\s*$")
COMMENT = re.compile(r"^<!--\s*(.*?)\s*-->\s*$")
TIMING = re.compile(r"\d+(?:[.,]\d+)*(?=\s*(?:tokens/s|tok/s|ms|s)\b)")


@dataclass
class Block:
    page: Path
    line: int  # 1-based line of the opening fence
    language: str
    code: str
    directives: dict[str, str]  # "not-run" -> reason, "slow" / "continues" -> ""
    end: int = 0  # 0-based line of the closing fence
    expected: str | None = None  # the text block that shows this example's output
    previous: list["Block"] | None = None  # the blocks a `continues` block runs first

    @property
    def id(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.line}"

    @property
    def runs(self) -> bool:
        return self.language in RUN_LANGUAGES and "not-run" not in self.directives

    @property
    def slow(self) -> bool:
        return self.language == "bash" or "slow" in self.directives


def parse_directives(comment: str) -> dict[str, str]:
    if comment.startswith("not-run"):  # the reason is free text, `;` included
        return {"not-run": comment.removeprefix("not-run").lstrip(" :").strip()}
    directives = {}
    for part in filter(None, (p.strip() for p in comment.split(";"))):
        name, _, reason = part.partition(":")
        directives[name.strip()] = reason.strip()
    return directives


def parse_page(page: Path) -> tuple[list[Block], list[str]]:
    """The page's fenced blocks, and the problems found in how they are marked."""
    lines = page.read_text().splitlines()
    blocks, problems = [], []
    where = lambda n: f"{page.relative_to(ROOT)}:{n + 1}"  # noqa: E731
    i = 0
    while i < len(lines):
        match = FENCE.match(lines[i])
        if not match:
            i += 1
            continue
        start, language = i, match.group(1)
        end = next((j for j in range(i + 1, len(lines)) if lines[j].rstrip() == "```"), None)
        if end is None:
            problems.append(f"{where(start)}: the fence is never closed")
            break
        if language not in RUN_LANGUAGES | SHOWN_LANGUAGES:
            problems.append(f"{where(start)}: fence language {language!r}; use one of "
                            f"{sorted(RUN_LANGUAGES | SHOWN_LANGUAGES)} (bash for shell commands)")
        comment = COMMENT.match(lines[start - 1]) if start > 0 else None
        directives = parse_directives(comment.group(1)) if comment else {}
        unknown = set(directives) - DIRECTIVES - {"not-run"}
        if unknown:
            problems.append(f"{where(start)}: unknown directive(s) {sorted(unknown)}; known: not-run: REASON, "
                            f"{', '.join(sorted(DIRECTIVES))}")
        if "not-run" in directives and not directives["not-run"]:
            problems.append(f"{where(start)}: `not-run` needs a reason (`<!-- not-run: needs ... -->`)")
        if directives and language not in RUN_LANGUAGES:
            problems.append(f"{where(start)}: directives only apply to python and bash blocks")
        blocks.append(Block(page, start + 1, language, "\n".join(lines[start + 1:end]), directives, end))
        i = end + 1

    # Expected outputs: a text block with only blank lines between it and the example before it.
    for before, after in zip(blocks, blocks[1:]):
        between = lines[before.end + 1:after.line - 1]
        if after.language == "text" and before.runs and not any(text.strip() for text in between):
            before.expected = after.code

    # `continues` chains.
    chain: list[Block] = []
    for block in blocks:
        if block.language != "python":
            continue
        if "continues" in block.directives:
            if not chain:
                problems.append(f"{where(block.line - 1)}: `continues` but no python block before it on the page")
            elif any(not b.runs for b in chain):
                problems.append(f"{where(block.line - 1)}: `continues` a block that does not run")
            block.previous = list(chain)
            chain.append(block)
        else:
            chain = [block]
    return blocks, problems


PARSED = {page: parse_page(page) for page in PAGES}
EXAMPLES = [block for blocks, _ in PARSED.values() for block in blocks if block.runs]


def normalise(text: str) -> list[str]:
    lines = [TIMING.sub("<timing>", line.rstrip()) for line in text.strip("\n").splitlines()]
    return lines


def run_python(block: Block, monkeypatch) -> str:
    monkeypatch.chdir(ROOT)
    namespace = {"__name__": "__docs_example__"}
    for earlier in block.previous or []:
        with contextlib.redirect_stdout(io.StringIO()):
            exec(compile(earlier.code, earlier.id, "exec"), namespace)
    captured = io.StringIO()
    with contextlib.redirect_stdout(captured):
        exec(compile(block.code, block.id, "exec"), namespace)
    return captured.getvalue()


def run_bash(block: Block) -> str:
    script = "\n".join(line for line in block.code.splitlines() if not line.lstrip().startswith("pip install"))
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])}
    result = subprocess.run(["bash", "-eo", "pipefail", "-c", script], cwd=ROOT, env=env, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, (f"{block.id} exited with {result.returncode}\n--- stdout\n{result.stdout}"
                                    f"\n--- stderr\n{result.stderr[-4000:]}")
    return result.stdout


def check_output(block: Block, output: str) -> None:
    if block.expected is None:
        return
    expected, actual = normalise(block.expected), normalise(output)
    assert actual == expected, (f"{block.id} no longer prints what the page shows.\n--- page\n"
                                + "\n".join(expected) + "\n--- actual\n" + "\n".join(actual))


@pytest.mark.parametrize("block", [pytest.param(b, id=b.id, marks=[pytest.mark.slow] if b.slow else [])
                                   for b in EXAMPLES])
def test_example_runs_and_prints_what_the_page_shows(block, monkeypatch):
    output = run_python(block, monkeypatch) if block.language == "python" else run_bash(block)
    check_output(block, output)


def test_every_block_is_marked_correctly():
    problems = [problem for _, page_problems in PARSED.values() for problem in page_problems]
    assert not problems, "\n".join(problems)
    assert EXAMPLES, "no runnable examples found"


def test_the_marking_rules_catch_mistakes(tmp_path, monkeypatch):
    page = tmp_path / "page.md"
    page.write_text("```sh\nls\n```\n\n<!-- not-run -->\n```python\nx = 1\n```\n<!-- quick -->\n```bash\nls\n```\n"
                    "```\nplain\n```\n")
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    _, problems = parse_page(page)
    assert any("fence language 'sh'" in p for p in problems)
    assert any("needs a reason" in p for p in problems)
    assert any("unknown directive(s) ['quick']" in p for p in problems)
    assert any("fence language ''" in p for p in problems)


def test_expected_output_comparison_ignores_only_timing(tmp_path, monkeypatch):
    page = tmp_path / "page.md"
    page.write_text("```python\nprint('7 forwards, 149.0 tokens/s, 0.19 s')\n```\n\n```text\n"
                    "7 forwards, 2.5 tokens/s, 11 s\n```\n")
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    (block, _), _ = parse_page(page)
    check_output(block, run_python(block, monkeypatch))
    with pytest.raises(AssertionError, match="no longer prints what the page shows"):
        check_output(block, "8 forwards, 149.0 tokens/s, 0.19 s\n")


def test_continues_runs_the_earlier_blocks_first(tmp_path, monkeypatch):
    page = tmp_path / "page.md"
    page.write_text("```python\nx = 20\n```\n\n<!-- continues -->\n```python\nprint(x + 1)\n```\n\n```text\n21\n```\n")
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    (_, second, _), problems = parse_page(page)
    assert not problems
    check_output(second, run_python(second, monkeypatch))


def test_every_public_name_is_in_the_api_reference_with_a_docstring():
    griffe = pytest.importorskip("griffe", reason="griffe comes with the docs extra (mkdocstrings[python])")
    reference = (DOCS / "api.md").read_text()
    package = griffe.load("dlm_generation", search_paths=[str(ROOT / "src")], resolve_aliases=True)
    missing, undocumented = [], []
    for name in dlm_generation.__all__:
        if not re.search(rf"^::: dlm_generation\.{re.escape(name)}\s*$", reference, re.MULTILINE):
            missing.append(name)
        member = package[name]
        if not (member.docstring and member.docstring.value.strip()):
            undocumented.append(name)
    assert not missing, f"add `::: dlm_generation.NAME` to docs/api.md for: {missing}"
    assert not undocumented, f"public names without a docstring: {undocumented}"


def test_readme_and_docs_links_point_to_files_that_exist():
    broken = []
    for page in PAGES:
        for target in re.findall(r"\]\(([^)\s]+)\)", page.read_text()):
            if re.match(r"[a-z]+://|#|mailto:", target):
                continue
            if not (page.parent / target.split("#")[0]).exists():
                broken.append(f"{page.relative_to(ROOT)} -> {target}")
    assert not broken, "\n".join(broken)


def test_no_absolute_paths_of_a_machine_in_the_docs():
    found = [f"{page.relative_to(ROOT)}:{n}: {line.strip()}"
             for page in [*PAGES, ROOT / "mkdocs.yml"] for n, line in enumerate(page.read_text().splitlines(), 1)
             if re.search(r"(?<![\w.])/(work|root|tmp|home)/", line)]
    assert not found, "\n".join(found)


def test_readme_stays_a_front_page():
    assert len((ROOT / "README.md").read_text().splitlines()) <= 250


@pytest.mark.slow
def test_mkdocs_build_strict(tmp_path):
    pytest.importorskip("mkdocs", reason="mkdocs comes with the docs extra: pip install -e '.[docs]'")
    result = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path)],
                            cwd=ROOT, capture_output=True, text=True, timeout=600,
                            env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})
    assert result.returncode == 0, result.stderr[-4000:]
