"""The docs in the repo (README.md and docs/) say what the code does: every command and flag they name exists,
docs/configuration.md lists every key of the schema exactly once with its default, every page and heading the
code cites exists, the file tree of docs/architecture.md is the repository's, and the README stays short and
starts with its two commands. Nothing here trains or runs a command: the parsers are built, not run."""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import re
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
README = ROOT / "README.md"
PAGES = sorted(DOCS.glob("*.md"))
MARKDOWN = [README, *PAGES]
EXPECTED_PAGES = {"algorithm", "architecture", "cli", "configuration", "evaluation", "install", "methods",
                  "performance", "results", "search"}

SETUP_COMMAND = ("python3 -m venv .venv && .venv/bin/pip install -c requirements.lock -e '.[test]' && "
                 ".venv/bin/python -m tune_mtard.search --space digits.yaml")
TEST_COMMAND = ".venv/bin/python -m pytest"
README_MAX_LINES = 160


# ------------------------------------------------------------------------------------------- markdown


@dataclasses.dataclass
class Snippet:
    """A piece of command-line text from the docs: one line of a code block, or one inline code span."""

    text: str
    where: str  # file:line, for messages
    inline: bool
    section: str  # the heading it sits under


FENCE = re.compile(r"^\s*```(\w*)")
HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*$")
INLINE_CODE = re.compile(r"`([^`\n]+)`")
SHELL_LANGUAGES = {"", "bash", "sh", "shell", "console"}


def shown(path: Path) -> Path:
    """A path as messages show it: relative to the repository when it is inside it."""
    return path.relative_to(ROOT) if path.is_relative_to(ROOT) else path


def snippets(path: Path) -> list[Snippet]:
    """Shell lines of the code blocks (continuation lines joined, comments dropped) and the inline code spans."""
    found: list[Snippet] = []
    section = ""
    language: str | None = None  # inside a code block: its language
    pending = ""
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        where = f"{shown(path)}:{number}"
        fence = FENCE.match(line)
        if fence:
            language = fence.group(1).lower() if language is None else None
            continue
        if language is not None:
            if language not in SHELL_LANGUAGES:
                continue
            text = line.split(" #")[0] if language in ("bash", "sh", "shell") else line
            if text.lstrip().startswith("#"):
                continue
            if text.rstrip().endswith("\\"):
                pending += text.rstrip()[:-1] + " "
                continue
            found.append(Snippet(pending + text, where, inline=False, section=section))
            pending = ""
            continue
        heading = HEADING.match(line)
        if heading:
            section = heading.group(2).replace("`", "")
            continue
        found.extend(Snippet(span, where, inline=True, section=section) for span in INLINE_CODE.findall(line))
    return found


def headings(path: Path) -> list[str]:
    found, in_code = [], False
    for line in path.read_text().splitlines():
        if FENCE.match(line):
            in_code = not in_code
        elif not in_code and HEADING.match(line):
            found.append(normalized(HEADING.match(line).group(2)))
    return found


def normalized(text: str) -> str:
    return " ".join(text.replace("`", "").split()).lower()


# ------------------------------------------------------------------------------------- the commands


def build_parsers() -> dict[str, argparse.ArgumentParser]:
    from tune_mtard.cli import COMMANDS

    return {name: importlib.import_module(f"tune_mtard.cli.{name}").build_parser() for name in COMMANDS}


PARSERS = build_parsers()


def subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def flags_of(parser: argparse.ArgumentParser) -> set[str]:
    return {flag for flag in parser._option_string_actions if flag.startswith("--")}


def tool_flags(tool: str) -> set[str]:
    """The flags a script in tools/ documents in its opening comment (its usage lines)."""
    header = []
    for line in (ROOT / tool).read_text().splitlines()[1:]:
        if not line.startswith("#"):
            break
        header.append(line)
    return set(FLAG.findall("\n".join(header)))


def valid_flags(command: str | None, sub: str | None) -> set[str]:
    """The flags a command (and subcommand) takes; all commands' flags when it is not known."""
    if command is not None and command.startswith("tools/"):
        return {"--help"} | tool_flags(command)
    if command is None:
        parsers = [p for parser in PARSERS.values() for p in (parser, *subcommands(parser).values())]
    elif sub is None:
        parsers = [PARSERS[command], *subcommands(PARSERS[command]).values()]
    else:
        parsers = [subcommands(PARSERS[command])[sub]]
    return {"--help"} | set().union(*(flags_of(p) for p in parsers))


MODULE_FORM = re.compile(r"python3? -m tune_mtard\.(?P<module>[A-Za-z_][\w.]*)")
PACKAGE_FORM = re.compile(r"python3? -m tune_mtard(?=\s|$)\s*(?P<word>\S*)")
SCRIPT_FORM = re.compile(r"^(?:[A-Z_]+=\S+\s+)*(?:time\s+)?(?:\S*/)?tune-mtard(?=\s|$)\s*(?P<word>\S*)")
BARE_FORM = re.compile(r"^(?:[A-Z_]+=\S+\s+)*(?P<word>[a-z]+)(?=\s|$)")
# Programs that are not ours: their flags are not checked.
TOOL_FORM = re.compile(r"(?:^|[\s(])(?P<tool>tools/[\w.-]+)(?=\s|$)")
FOREIGN = re.compile(r"(?:^|[\s/(])(?:mlflow|ray|pip3?|git|pytest)(?=\s|$)")
FLAG = re.compile(r"(?<![\w-])--[a-z][a-z0-9-]*")
WORD = re.compile(r"[a-z][a-z-]*")


@dataclasses.dataclass
class Invocation:
    """A command named in the docs, where its flags start, and the problem with it (if any)."""

    command: str | None
    sub: str | None
    start: int
    problem: str = ""


def command_file_exists(command: str) -> bool:
    package = ROOT / "tune_mtard"
    return (package / f"{command}.py").is_file() or (package / command / "__main__.py").is_file()


def with_subcommand(command: str, rest: str, start: int) -> Invocation:
    """``bench step``: the word after a command that has subcommands must be one of them."""
    subs = subcommands(PARSERS[command])
    first = rest.split()[0] if rest.split() else ""
    if not subs or not WORD.fullmatch(first):
        return Invocation(command, None, start)
    if first not in subs:
        return Invocation(command, None, start, f"`{command} {first}`: no such subcommand (valid: {', '.join(subs)})")
    return Invocation(command, first, start)


def invocations(snippet: Snippet) -> list[Invocation]:
    """Our commands named in the snippet, in order (a foreign program ends the previous one's flags)."""
    text = snippet.text
    found: list[Invocation] = []
    for match in MODULE_FORM.finditer(text):
        module = match.group("module").rstrip(".")
        if module not in PARSERS or not command_file_exists(module):
            found.append(Invocation(None, None, match.end(), f"`python -m tune_mtard.{module}`: no such command"))
        else:
            found.append(with_subcommand(module, text[match.end():], match.end()))
    for match in PACKAGE_FORM.finditer(text):
        word = match.group("word")
        if word in PARSERS:
            found.append(with_subcommand(word, text[match.end():], match.end()))
        elif word and not word.startswith(("<", "-")):
            found.append(Invocation(None, None, match.end(), f"`python -m tune_mtard {word}`: no such command"))
    stripped = text.strip()
    offset = len(text) - len(text.lstrip())
    script = SCRIPT_FORM.match(stripped)
    if script:
        word = script.group("word")
        end = offset + script.end()
        if word in PARSERS:
            found.append(with_subcommand(word, text[end:], end))
        elif word and not word.startswith(("<", "-")):
            found.append(Invocation(None, None, end, f"`tune-mtard {word}`: no such command"))
    bare = BARE_FORM.match(stripped) if snippet.inline else None
    if bare and bare.group("word") in PARSERS:
        end = offset + bare.end()
        found.append(with_subcommand(bare.group("word"), text[end:], end))
    for match in TOOL_FORM.finditer(text):
        tool = match.group("tool")
        problem = "" if (ROOT / tool).is_file() else f"`{tool}`: no such script"
        found.append(Invocation(tool, None, match.end(), problem))
    for match in FOREIGN.finditer(text):
        found.append(Invocation("foreign", None, match.end()))
    return sorted(found, key=lambda inv: inv.start)


def section_context(snippet: Snippet, path: Path) -> tuple[str | None, str | None]:
    """Under a command's heading in docs/cli.md (``## search``, ``### bench step``), flags are that command's."""
    if path.name != "cli.md":
        return None, None
    words = snippet.section.split()
    if words and words[0] in PARSERS:
        sub = words[1] if len(words) > 1 and words[1] in subcommands(PARSERS[words[0]]) else None
        return words[0], sub
    return None, None


def command_problems(path: Path) -> list[str]:
    problems = []
    for snippet in snippets(path):
        for segment in re.split(r"&&|\|\||;|\|", snippet.text):
            piece = Snippet(segment, snippet.where, snippet.inline, snippet.section)
            found = invocations(piece)
            problems += [f"{snippet.where}: {inv.problem}" for inv in found if inv.problem]
            for flag in FLAG.finditer(segment):
                owner = [inv for inv in found if inv.start <= flag.start()]
                if owner:
                    inv = owner[-1]
                    if inv.command == "foreign" or inv.problem:
                        continue
                    command, sub = inv.command, inv.sub
                else:
                    command, sub = section_context(piece, path)
                if flag.group() not in valid_flags(command, sub):
                    named = " ".join(x for x in (command, sub) if x) or "any command"
                    problems.append(f"{snippet.where}: {flag.group()} is not a flag of {named} "
                                    f"(in `{segment.strip()}`)")
    return problems


def test_the_docs_pages_exist():
    assert {p.stem for p in PAGES} >= EXPECTED_PAGES


def test_every_command_has_a_build_parser_and_a_heading_in_docs_cli_md():
    cli_headings = headings(DOCS / "cli.md")
    for name, parser in PARSERS.items():
        assert isinstance(parser, argparse.ArgumentParser), name
        assert name in cli_headings, f"docs/cli.md has no heading '## {name}'"
        for sub in subcommands(parser):
            assert f"{name} {sub}" in cli_headings, f"docs/cli.md has no heading '### {name} {sub}'"


@pytest.mark.parametrize("path", MARKDOWN, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_command_and_flag_the_docs_name_exists(path):
    assert command_problems(path) == []


def test_every_flag_of_every_command_is_in_docs_cli_md():
    text = (DOCS / "cli.md").read_text()
    missing = [f"{name} {flag}" for name, parser in PARSERS.items()
               for p in (parser, *subcommands(parser).values()) for flag in flags_of(p) - {"--help"}
               if not re.search(rf"`{re.escape(flag)}[`\s]", text)]
    assert missing == []


def test_the_flag_checker_catches_what_does_not_exist(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("Run `python -m tune_mtard.search --spaces x.yaml` or `bench steps`, then\n\n"
                    "```bash\npython -m tune_mtard.analyse --experiment DIR\n"
                    "tune-mtard train --config a.yaml --max-epochs 3\nmlflow ui --port 5000\n```\n"
                    "And `--no-such-flag`, `tune-mtard evaluate --n 5`, `tools/check-latest --write`,\n"
                    "`tools/check-latest --rewrite`, `tools/no-such-tool`.\n")
    problems = command_problems(page)
    assert len(problems) == 7, problems
    for expected in ("--spaces", "bench steps", "tune_mtard.analyse", "--max-epochs is not a flag of train",
                     "--no-such-flag", "--rewrite is not a flag of tools/check-latest", "tools/no-such-tool"):
        assert any(expected in p for p in problems), (expected, problems)


# ------------------------------------------------------------------------------ docs/configuration.md


def as_yaml(value: Any) -> str:
    """A default as the docs write it: YAML, flow style (``0.1``, ``auto``, ``[0.7167, 0.8667, 0.95]``, ``true``)."""
    return yaml.safe_dump(value, default_flow_style=True, width=10_000).strip().removesuffix("...").strip()


def schema_defaults() -> dict[str, Any]:
    """Every leaf key of the schema with its default; ``space.<key>.<field>`` for a distribution's fields."""
    from tune_mtard.config import Config, Distribution, flatten
    from tune_mtard.config.coerce import to_plain
    from tune_mtard.config.search import SearchConfig

    defaults = dict(flatten(Config().to_dict()))
    defaults.update(flatten(to_plain(SearchConfig()), "search."))
    # a mapping whose default is empty (search.storage_options) is a leaf key too
    defaults.update({f"search.{f.name}": {} for f in dataclasses.fields(SearchConfig)
                     if to_plain(getattr(SearchConfig(), f.name)) == {}})
    for f in dataclasses.fields(Distribution):
        defaults[f"space.<key>.{f.name}"] = dataclasses.MISSING if f.default is dataclasses.MISSING else f.default
    return defaults


TABLE_HEADER = re.compile(r"^\|\s*key\s*\|\s*default\s*\|\s*rule\s*\|\s*meaning\s*\|\s*$")
FRACTION = re.compile(r"^\d+/\d+$")


def documented_keys() -> list[tuple[str, str]]:
    """(key, default cell) of every row of every ``key | default | rule | meaning`` table."""
    rows, in_table = [], False
    for line in (DOCS / "configuration.md").read_text().splitlines():
        if TABLE_HEADER.match(line):
            in_table = True
            continue
        if in_table and line.startswith("|"):
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            if set(cells[0]) <= {"-", ":", " "}:
                continue
            key = re.fullmatch(r"`([^`]+)`", cells[0])
            assert key, f"docs/configuration.md: key cell {cells[0]!r} is not one `dotted.key`"
            rows.append((key.group(1), cells[1]))
        else:
            in_table = False
    return rows


def test_docs_configuration_md_lists_every_schema_key_exactly_once_and_no_other():
    documented = Counter(key for key, _ in documented_keys())
    expected = set(schema_defaults())
    assert sorted(k for k in expected if k not in documented) == [], "keys of the schema missing from the page"
    assert sorted(k for k in documented if k not in expected) == [], "keys on the page that the schema lacks"
    assert sorted(k for k, n in documented.items() if n > 1) == [], "keys listed more than once"


def test_docs_configuration_md_gives_each_key_the_schemas_default():
    from tune_mtard.config import parse_number

    defaults = schema_defaults()
    wrong = []
    for key, cell in documented_keys():
        if key not in defaults:
            continue
        default = defaults[key]
        if default is dataclasses.MISSING:
            if cell != "required":
                wrong.append(f"{key}: {cell} (expected: required)")
            continue
        written = re.fullmatch(r"`([^`]*)`", cell)
        text = written.group(1) if written else None
        exact_fraction = text is not None and FRACTION.match(text) and parse_number(text, key) == default
        if text != as_yaml(default) and not exact_fraction:
            wrong.append(f"{key}: {cell} (expected: `{as_yaml(default)}`)")
    assert wrong == []


# ------------------------------------------------------------------------------------------ citations

CITATION = re.compile(r"docs/(?P<page>[\w-]+\.md)(?P<rest>,\s*(?:\"(?P<heading>[^\"]+)\"|"
                      r"steps?\s+(?P<steps>\d+(?:\s*(?:-|–|and|,)\s*\d+)*)))?")
LINK = re.compile(r"\]\((?P<target>[^)\s]+)\)(?:,\s*\"(?P<heading>[^\"]+)\")?")
CITING_FILES = sorted(
    [p for folder in ("tune_mtard", "trainables", "tests", "search_spaces")
     for p in (ROOT / folder).rglob("*") if p.suffix in (".py", ".yaml") and "__pycache__" not in p.parts]
    + MARKDOWN)


def step_numbers(text: str) -> list[int]:
    numbers: list[int] = []
    for part in re.split(r"\s*(?:and|,)\s*", text):
        low, _, high = part.replace("–", "-").partition("-")
        numbers += list(range(int(low), int(high or low) + 1))
    return numbers


def heading_problem(page: Path, heading: str | None, steps: str | None) -> str:
    if not page.is_file():
        return f"{shown(page)} does not exist"
    titles = headings(page)
    if heading is not None and normalized(heading) not in titles:
        return f"{shown(page)} has no heading {heading!r}"
    for n in step_numbers(steps) if steps else []:
        if not any(re.search(rf"\bstep\s+{n}\b", title) for title in titles):
            return f"{shown(page)} has no heading for step {n}"
    return ""


def citation_problems(path: Path) -> list[str]:
    text = path.read_text()
    problems = []
    for match in CITATION.finditer(text):
        problem = heading_problem(DOCS / match.group("page"), match.group("heading"), match.group("steps"))
        if problem:
            line = text.count("\n", 0, match.start()) + 1
            problems.append(f"{path.relative_to(ROOT)}:{line}: {match.group(0)!r}: {problem}")
    if path.suffix == ".md":
        for match in LINK.finditer(text):
            target = match.group("target")
            if re.match(r"^[a-z]+:", target):
                continue  # a web address
            file_part = target.split("#")[0]
            page = (path.parent / file_part).resolve() if file_part else path
            heading = match.group("heading") if page.suffix == ".md" else None
            problem = heading_problem(page, heading, None) if page.suffix == ".md" else (
                "" if page.exists() else f"{file_part} does not exist")
            if problem:
                line = text.count("\n", 0, match.start()) + 1
                problems.append(f"{path.relative_to(ROOT)}:{line}: link {target!r}: {problem}")
    return problems


def test_every_docs_page_and_heading_the_code_and_docs_cite_exists():
    problems = [p for path in CITING_FILES for p in citation_problems(path)]
    assert problems == []


def test_the_citation_checker_reads_headings_and_steps():
    algorithm = DOCS / "algorithm.md"
    assert heading_problem(algorithm, "Balance trace", None) == ""
    assert heading_problem(algorithm, None, "1-7") == ""
    assert heading_problem(algorithm, None, "4 and 5") == ""
    assert "step 8" in heading_problem(algorithm, None, "8")
    assert "no heading" in heading_problem(algorithm, "No such heading", None)
    assert "does not exist" in heading_problem(DOCS / "nowhere.md", None, None)


# ---------------------------------------------------------------------------------- architecture tree

TREE_LINE = re.compile(r"^(?P<indent> *)(?P<name>\S+)")


def tree_paths() -> set[str]:
    """The paths of the file tree in docs/architecture.md (two spaces of indent per level)."""
    lines = (DOCS / "architecture.md").read_text().split("## File tree", 1)[1].split("```")[1].splitlines()[1:]
    paths, parents = set(), []
    for line in lines:
        match = TREE_LINE.match(line)
        if not match:
            continue
        depth = len(match.group("indent")) // 2
        parents = parents[:depth]
        name = match.group("name")
        path = "/".join([*parents, name.rstrip("/")])
        paths.add(path + ("/" if name.endswith("/") else ""))
        if name.endswith("/"):
            parents.append(name.rstrip("/"))
    return paths


def repository_files() -> set[str]:
    found = set()
    for folder, patterns in (("tune_mtard", ("**/*.py",)), ("trainables", ("*.py",)),
                             ("search_spaces", ("*.py", "*.yaml")), ("tests", ("*.py",))):
        for pattern in patterns:
            found |= {str(p.relative_to(ROOT)) for p in (ROOT / folder).glob(pattern) if "__pycache__" not in p.parts}
    return found


def test_the_file_tree_in_docs_architecture_md_is_the_repositorys():
    listed = tree_paths()
    assert sorted(p for p in listed if not (ROOT / p.rstrip("/")).exists()) == [], "listed but not in the repository"
    assert sorted(repository_files() - listed) == [], "in the repository but not in docs/architecture.md's tree"


# --------------------------------------------------------------------------------------------- README


def test_readme_is_short():
    assert len(README.read_text().splitlines()) <= README_MAX_LINES


def test_readme_starts_with_the_setup_and_test_commands():
    text = README.read_text()
    before, fence, rest = text.partition("```bash\n")
    assert fence and "\n## " not in before, "the first thing after the introduction is the commands block"
    block = rest.split("```", 1)[0]
    commands = [line for line in block.splitlines() if line.strip() and not line.startswith("#")]
    assert commands == [SETUP_COMMAND, TEST_COMMAND]


def test_readme_links_every_docs_page():
    text = README.read_text()
    assert sorted(p.name for p in PAGES if f"](docs/{p.name})" not in text) == []
