"""The README and docs/*.md, checked against the repository so that they cannot rot silently.

Every fenced ```bash block of README.md and docs/*.md is split into its commands, and each command is
checked as written, from the repository root:

- every script, file and folder it names exists (`bash X`, `.venv/bin/python X.py`, pytest's paths and
  test names, the raw-result files a script reads), every `python -m` module can be imported, and every
  `RUNLORA_*` variable it sets is one lora_rewrite reads;
- every flag is accepted: `runlora-bench` (and `python -m lora_rewrite.bench`) commands are parsed by the
  benchmark's own argparse parser and its argument checks, `examples/finetune.py` commands by the main
  job's parser, a `scripts/*.py` command's `--flags` must be ones the script defines, and `STAGES=…` must
  name stages of the script it is given to;
- the cheap commands are also **run**, exactly as written: every `--help`, `scripts/overhead_table.py`
  (it prints tables from the raw JSON under docs/results/) and `scripts/model_flop_share.py` (a few seconds).
  Their output is compared with the pages: BENCHMARKS.md's "Current standing" is what
  `scripts/will_it_help.py --standing` prints, and the history's tables are what its "How to reproduce"
  commands print.

The expensive commands — the benchmarks themselves, the main job, the whole test suite, `setup.sh`, the
torch-version script — are checked for existence and flags only, never run here.

Then the README's promises: its matrix and headline are what `scripts/will_it_help.py` prints from the raw
results, its pasted output of the main job is the one BENCHMARKS.md keeps,
it stays under 180 lines, its set-up commands are the ones .ci/run runs, and each of the four questions a
reader comes with is answered by a link to the page that answers it. Finally every relative link (and
#anchor) in these pages resolves, every test named in docs/supported.md exists, and no page names a path of
one machine. ```python blocks are only parsed (they hold placeholders such as `...`), not run.
"""

from __future__ import annotations

import ast
import json
import importlib.util
import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = ROOT / "docs"
PAGES = [README] + sorted(DOCS.glob("*.md"))
BENCHMARKS = DOCS / "BENCHMARKS.md"

# Commands that run in a few seconds, so the test runs them as written.
CHEAP_SCRIPTS = ("scripts/overhead_table.py", "scripts/dora_table.py", "scripts/qlora_table.py",
                 "scripts/model_flop_share.py", "scripts/mixed_precision_floor.py")
# Programs a documented command may call besides ours; they are not checked further.
PLAIN_PROGRAMS = {"cd", "mktemp", "pip"}
PYTHONS = {".venv/bin/python", "python", "python3"}
BENCHES = {".venv/bin/runlora-bench", "runlora-bench"}


# --- reading the pages ------------------------------------------------------------------------------

@dataclass(frozen=True)
class Block:
    page: Path
    line: int        # of the opening fence
    lang: str
    text: str


def fenced_blocks(page: Path) -> list[Block]:
    blocks, lang, start, body = [], None, 0, []
    for number, line in enumerate(page.read_text().splitlines(), 1):
        if line.startswith("```"):
            if lang is None:
                lang, start, body = line[3:].strip(), number, []
            else:
                blocks.append(Block(page, start, lang, "\n".join(body)))
                lang = None
        elif lang is not None:
            body.append(line)
    assert lang is None, f"{page.name}: the fence opened at line {start} is never closed"
    return blocks


def outside_fences(text: str) -> str:
    return re.sub(r"^```.*?^```[^\n]*$", "", text, flags=re.S | re.M)


def section(text: str, heading: str) -> str:
    """The text under `heading` (a whole heading line), up to the next heading of the same or a higher level."""
    lines = text.splitlines()
    level = len(heading) - len(heading.lstrip("#"))
    start = lines.index(heading) + 1
    end, fence = len(lines), False
    for k in range(start, len(lines)):
        if lines[k].startswith("```"):
            fence = not fence
        m = re.match(r"(#+) ", lines[k])
        if m and not fence and len(m.group(1)) <= level:
            end = k
            break
    return "\n".join(lines[start:end])


def split_row(line: str) -> list[str]:
    return [cell.strip() for cell in re.split(r"(?<!\\)\|", line.strip().strip("|"))]


def tables(text: str) -> list[list[dict[str, str]]]:
    """Every markdown table in `text`, as rows of {header: cell}."""
    found, lines = [], text.splitlines()
    k = 0
    while k < len(lines) - 1:
        if lines[k].startswith("|") and re.match(r"^\|[\s:|-]+\|$", lines[k + 1].strip()):
            header = split_row(lines[k])
            rows, k = [], k + 2
            while k < len(lines) and lines[k].startswith("|"):
                rows.append(dict(zip(header, split_row(lines[k]))))
                k += 1
            found.append(rows)
        else:
            k += 1
    return found


def slug(heading: str) -> str:
    """GitHub's anchor of a heading."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower().replace("`", "")).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    found, counts = set(), {}
    for line in outside_fences(page.read_text()).splitlines():
        m = re.match(r"#+ (.*)", line)
        if m:
            s = slug(m.group(1))
            found.add(f"{s}-{counts[s]}" if s in counts else s)   # a repeated heading gets -1, -2, …
            counts[s] = counts.get(s, 0) + 1
    return found


# --- commands ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Command:
    block: Block
    line: str                 # the command line as written (continuations joined)
    env: tuple                # NAME=value assignments before the program
    argv: tuple

    @property
    def where(self) -> str:
        return f"{self.block.page.relative_to(ROOT)}:{self.block.line}: {self.line}"


def command_lines(block: Block) -> list[str]:
    joined = block.text.replace("\\\n", " ")
    return [line for line in joined.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def parse_commands(block: Block) -> list[Command]:
    commands = []
    for line in command_lines(block):
        lex = shlex.shlex(re.sub(r"\$\([^)]*\)", "SUBSTITUTED", line), posix=True, punctuation_chars=True)
        lex.whitespace_split = True
        words, current = list(lex), []
        for word in words + ["&&"]:
            if word in ("&&", "||", ";", "|"):
                if current:
                    env = []
                    while current and re.match(r"^[A-Z_][A-Z0-9_]*=", current[0]):
                        env.append(current.pop(0))
                    if current and current[0] == "export":
                        env += current[1:]
                        current = []
                    commands.append(Command(block, line.split("#")[0].strip() if " #" in line else line.strip(),
                                            tuple(env), tuple(current)))
                current = []
            else:
                current.append(word)
    return commands


def all_commands() -> list[Command]:
    return [c for page in PAGES for b in fenced_blocks(page) if b.lang in ("bash", "sh", "shell")
            for c in parse_commands(b)]


COMMANDS = all_commands()


def is_cheap(command: Command) -> bool:
    argv = command.argv
    return "--help" in argv or any(a in CHEAP_SCRIPTS for a in argv[1:2])


@lru_cache(maxsize=None)
def bench_parser():
    from lora_rewrite.bench import __main__ as bench_main

    return bench_main


@lru_cache(maxsize=None)
def finetune_module():
    spec = importlib.util.spec_from_file_location("docs_finetune", ROOT / "examples" / "finetune.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module   # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def argparse_accepts(parse, args: list[str], where: str) -> None:
    try:
        parse(args)
    except SystemExit as e:
        if e.code:   # argparse exits 2 on a flag or value it does not accept
            pytest.fail(f"{where}: rejected by the program's own argument parser (exit {e.code})")


def check_bench(args: list[str], where: str) -> None:
    bench = bench_parser()
    parser = bench.build_parser()

    def parse(argv):
        ns = parser.parse_args(argv)
        if hasattr(bench, "_check_args"):
            bench._check_args(parser, ns)
        return ns

    argparse_accepts(parse, args, where)
    if "--help" in args:
        return
    ns = parser.parse_args(args)
    model = getattr(ns, "model_name_or_config", None)
    if model and not model.startswith("tiny-"):
        shipped = ROOT / "lora_rewrite" / "bench" / "configs" / f"{model}.json"
        assert shipped.exists() or (ROOT / model).exists(), f"{where}: no model config {model!r}"


def check_pytest(args: list[str], where: str) -> None:
    takes_value = {"-k", "-m", "-p", "-o", "--maxfail", "-n"}
    skip = False
    for arg in args:
        if skip:
            skip = False
            continue
        if arg in takes_value:
            skip = True
            continue
        if arg.startswith("-"):
            continue
        path, _, test = arg.partition("::")
        assert (ROOT / path).exists(), f"{where}: {path} does not exist"
        if test:
            name = test.split("[")[0].split("::")[-1]
            assert re.search(rf"def {re.escape(name)}\b", (ROOT / path).read_text()), f"{where}: no test {name}"


def check_script(script: str, args: list[str], where: str) -> None:
    path = ROOT / script
    assert path.is_file(), f"{where}: {script} does not exist"
    if script == "examples/finetune.py":
        argparse_accepts(finetune_module().parse_args, args, where)
        return
    source = path.read_text()
    for arg in args:
        if arg.startswith("--") and arg != "--help":
            assert f'"{arg}"' in source or f"'{arg}'" in source, f"{where}: {script} has no flag {arg}"
        elif arg.endswith((".json", ".csv", ".md")) and "/" in arg:
            assert (ROOT / arg).exists(), f"{where}: {arg} does not exist"


def check_env(command: Command) -> None:
    sources = "\n".join(p.read_text() for p in (ROOT / "lora_rewrite").glob("*.py"))
    for assignment in command.env:
        name, _, value = assignment.partition("=")
        if name.startswith("RUNLORA_"):
            assert f'"{name}"' in sources, f"{command.where}: lora_rewrite reads no {name}"
        if name == "STAGES":
            script = next((a for a in command.argv[1:] if a.endswith(".sh")), None)
            assert script, f"{command.where}: STAGES without a script"
            text = (ROOT / script).read_text()
            for stage in value.split():
                assert f'*" {stage} "*' in text, f"{command.where}: {script} has no stage {stage!r}"


def check_command(command: Command) -> None:
    check_env(command)
    if not command.argv:
        return
    program, *args = command.argv
    where = command.where
    if program in PLAIN_PROGRAMS:
        return
    if program == "bash":
        assert args and (ROOT / args[0]).is_file(), f"{where}: no script {args[:1]}"
        return
    if program in BENCHES:
        check_bench(args, where)
        return
    assert program in PYTHONS, f"{where}: an unknown program {program!r} (add it to the checks)"
    if args[:1] == ["-m"]:
        module, rest = args[1], args[2:]
        if module == "pytest":
            check_pytest(rest, where)
        elif module == "lora_rewrite.bench":
            check_bench(rest, where)
        else:
            assert importlib.util.find_spec(module) is not None, f"{where}: no module {module}"
        return
    assert args, f"{where}: python with nothing to run"
    check_script(args[0], args[1:], where)


def test_the_pages_hold_commands_to_check():
    """A parser that finds nothing would pass everything."""
    pages = {c.block.page.name for c in COMMANDS}
    assert {"README.md", "guide.md", "BENCHMARKS.md"} <= pages, pages
    assert sum(is_cheap(c) for c in COMMANDS) >= 5
    assert any(c.argv[:1] == ("bash",) for c in COMMANDS)


BAD_COMMANDS = {   # what the checker must reject: a wrong flag, a missing script, a stage that does not exist
    "runlora-bench --layer --in 1024 --rankk 16": "rejected",
    ".venv/bin/python examples/finetune.py --stepz 3": "rejected",
    ".venv/bin/python scripts/no_such_script.py": "does not exist",
    ".venv/bin/python scripts/overhead_table.py --no-such-flag x.json": "has no flag",
    'STAGES="layers nonsense" bash docs/results/cpu/lowering/run_lowering.sh': "has no stage",
    "RUNLORA_NO_SUCH_VARIABLE=1 .venv/bin/python examples/finetune.py": "reads no",
    ".venv/bin/python -m pytest tests/passes/test_match.py::test_no_such_test": "no test",
    "tlparse trace": "unknown program",
}


@pytest.mark.parametrize("line", BAD_COMMANDS)
def test_the_checker_rejects_what_does_not_exist(line):
    (command,) = parse_commands(Block(README, 0, "bash", line))
    with pytest.raises((AssertionError, pytest.fail.Exception), match=BAD_COMMANDS[line]):
        check_command(command)


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: c.where[:120])
def test_every_documented_command_names_what_exists_with_flags_it_accepts(command):
    check_command(command)


def run_as_written(command: Command) -> subprocess.CompletedProcess:
    line = command.line
    if not (ROOT / ".venv" / "bin" / "python").exists():   # an environment that is not setup.sh's
        line = line.replace(".venv/bin/python", sys.executable)
        line = line.replace(".venv/bin/runlora-bench", str(Path(sys.executable).parent / "runlora-bench"))
    return subprocess.run(["bash", "-c", line], cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONWARNINGS": "ignore"})


@lru_cache(maxsize=None)
def cheap_outputs() -> dict[str, str]:
    outputs = {}
    for command in COMMANDS:
        if is_cheap(command) and command.line not in outputs:
            result = run_as_written(command)
            assert result.returncode == 0, f"{command.where}\n{result.stderr[-2000:]}"
            outputs[command.line] = result.stdout
    return outputs


def test_the_cheap_commands_run_as_written():
    outputs = cheap_outputs()
    for line, out in outputs.items():
        assert out.strip(), f"{line}: printed nothing"
        if "--help" in line.split():
            assert "usage:" in out, line


STANDING_START = "<!-- the output of scripts/will_it_help.py --standing (tests/test_docs.py checks it) -->"
STANDING_END = "<!-- end of scripts/will_it_help.py --standing's output -->"


def test_the_current_standing_is_what_the_script_prints_from_the_raw_results():
    """BENCHMARKS.md's current standing is `scripts/will_it_help.py --standing`, exactly: every case of each
    configuration of the README's matrix, from the raw results it names (a row in History is as it was
    written, and is not re-checked)."""
    text = BENCHMARKS.read_text()
    standing = section(text, "## Current standing")
    block = standing.split(STANDING_START)[1].split(STANDING_END)[0].strip()
    assert block == "\n".join(will_it_help().standing()).strip(), \
        "BENCHMARKS' current standing differs from `python scripts/will_it_help.py --standing`: paste its output"
    assert len(standing.splitlines()) <= 230 and "## History" in text
    assert len([row for table in tables(standing) for row in table if "case" in row]) >= 40


def test_the_overhead_tables_of_the_history_are_what_their_scripts_print():
    """The tables the How-to-reproduce commands print (overhead_table, dora_table, qlora_table) are the ones
    the history keeps, row for row, where the history has that case in those columns."""
    printed = [row for line, out in cheap_outputs().items()
               if any(script in line for script in ("overhead_table.py", "dora_table.py", "qlora_table.py"))
               for table in tables(out) for row in table]
    assert printed, "no overhead_table command in the docs"
    history = section(BENCHMARKS.read_text(), "## History")
    kept = [row for table in tables(history) for row in table if "case" in row]
    matched = [row for row in kept if any(all(p.get(col) == value for col, value in row.items()) for p in printed
                                          if p.get("case") == row["case"])]
    assert len(matched) >= 20, f"only {len(matched)} history rows are printed by the reproduce commands"


def test_the_model_flop_share_quoted_is_what_the_script_prints():
    out = next(out for line, out in cheap_outputs().items() if "model_flop_share.py" in line)
    m = re.search(r"^(\S+ b=\d+ s=\d+ r=\d+ \w+): .* share ([\d.]+)%", out, re.M)
    assert m, out
    case, share = m.group(1), float(m.group(2))
    rows = [line for line in BENCHMARKS.read_text().splitlines() if line.startswith(f"| {case} |")]
    assert any(f"| {share:.1f} % |" in row for row in rows), (case, share, rows)


def test_the_mixed_precision_floor_is_what_the_script_prints():
    """The floor table for PEFT's fp32 adapters on a bf16 model is the script's output from the raw results it
    names, row for row (its first line, the GEMM this machine's torch has, is said in the prose)."""
    out = next(out for line, out in cheap_outputs().items() if "mixed_precision_floor.py" in line)
    rows = [line for line in out.splitlines() if line.startswith("| i=")]
    assert rows, out
    text = BENCHMARKS.read_text()
    heading = next(line for line in text.splitlines() if line.startswith("## The floor for PEFT's fp32 adapters"))
    floor = section(text, heading)
    for row in rows:
        assert row in floor.splitlines(), row
    if "CPU: no" in out:
        assert "torch 2.13 has no such GEMM on the CPU" in floor


# --- the README -------------------------------------------------------------------------------------

README_TO_BENCHMARKS = {"stock Inductor overhead": "Inductor overhead", "runlora overhead": "runlora overhead",
                        "runlora vs stock Inductor": "speedup vs Inductor", "A/A": "A/A"}
NUMBER = re.compile(r"[+\-−]?\d[\d,]*(?:\.\d+)?\s?(?:×|%|MB)")


def test_the_readme_is_short():
    assert len(README.read_text().splitlines()) <= 180


MATRIX_START = "<!-- the output of scripts/will_it_help.py (tests/test_docs.py checks it) -->"
MATRIX_END = "<!-- end of scripts/will_it_help.py's output -->"


def will_it_help():
    import importlib.util

    spec = importlib.util.spec_from_file_location("will_it_help", ROOT / "scripts" / "will_it_help.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module   # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_the_readme_matrix_is_what_the_script_prints_from_the_raw_results():
    """The "Will it help you?" matrix and its sentence are scripts/will_it_help.py's output, exactly; the
    section's prose states no number the script does not print."""
    text = README.read_text()
    block = text.split(MATRIX_START)[1].split(MATRIX_END)[0].strip()
    printed = "\n".join(will_it_help().readme_block())
    assert block == printed, "README's matrix differs from `python scripts/will_it_help.py`: paste its output"
    matrix = section(text, "## Will it help you?")
    prose = matrix.replace(block, "")
    for number in NUMBER.findall(prose):
        assert number in printed, f"README 'Will it help you?' states {number!r}, which the script does not print"
    assert re.search(r"no GPU has been measured", matrix, re.I) and "docs/BENCHMARKS.md" in matrix


def test_the_headline_and_the_matrix_are_stated_on_one_page():
    """The headline speedup and the matrix's ranges are the README's, printed by the script; another page that
    quoted them would drift from it (it links to the README's matrix instead)."""
    module = will_it_help()
    speed = re.compile(r"\d+\.\d+–\d+\.\d+×|\d+\.\d{3}×")   # a row's range, or the headline's geomean
    numbers = set(speed.findall("\n".join(module.readme_block())))
    headline = re.search(r"[\d.]+×", module.headline()).group(0)
    assert README.read_text().count(headline) == 1 and headline in numbers and len(numbers) >= 8
    for page in (DOCS / "guide.md", DOCS / "supported.md", DOCS / "design.md"):
        prose = outside_fences(page.read_text())
        quoted = sorted(n for n in set(speed.findall(prose)) if n in numbers)
        assert headline not in prose and not quoted, f"{page.name} quotes the matrix's {quoted or headline}"


def test_the_matrix_reads_kept_memory_runs_as_kept_and_default_malloc_runs_as_default():
    module = will_it_help()
    rows = module.SOURCES
    assert len(rows) >= 10 and all(row.kept or row.default for row in rows)
    for row in rows:
        for sources, kept in ((row.kept, True), (row.default, False)):
            for name, (stock, ours) in sources:
                data = json.loads((module.RESULTS / name).read_text())
                assert any("keep-freed" in n for n in data.get("notes", [])) == kept, (row.name, name)
                assert any(stock in {r["implementation"] for r in c["rows"]} and
                           ours in {r["implementation"] for r in c["rows"]} for c in data["cases"]), (name, stock, ours)


def test_the_readme_main_job_output_is_the_one_benchmarks_keeps():
    lines = README.read_text().splitlines()
    start = lines.index("## Did it help?") + 1
    end = next(k for k in range(start, len(lines)) if lines[k].startswith("## "))
    outputs = [b for b in fenced_blocks(README) if b.lang == "" and start < b.line < end]
    assert outputs, "README 'Did it help?' shows no output"
    bench_text = BENCHMARKS.read_text()
    bench_lines = set(bench_text.splitlines())
    for line in outputs[0].text.splitlines():
        assert line in bench_lines, f"README output line not in BENCHMARKS.md: {line!r}"
    prose = outside_fences("\n".join(lines[start:end]))
    for number in NUMBER.findall(prose):
        assert number in bench_text, f"README 'Did it help?' quotes {number!r}, not in BENCHMARKS.md"
    facts = re.findall(r"`([0-9a-f]{7})`", prose) + re.findall(r"\d{4}-\d\d-\d\d", prose)
    assert facts, "README 'Did it help?' names no commit or date for its output"
    for fact in facts:
        assert fact in bench_text, fact


def test_the_readme_set_up_commands_are_the_ones_ci_runs():
    text = README.read_text()
    main_job = "bash setup.sh && .venv/bin/python examples/finetune.py"
    tests = "bash setup.sh && .venv/bin/python -m pytest"
    quick = [c.line for c in COMMANDS if c.block.page == README]
    assert main_job in quick and tests in quick, quick
    ci = (ROOT / ".ci" / "run").read_text()
    assert re.search(rf"^[^#\n]*{re.escape(tests)}\s*$", ci, re.M), ".ci/run no longer runs the README's tests"
    assert "## Quick start" in text


QUESTIONS = {   # the reader's question → (the page that answers it, what that page must hold)
    "How do I turn it on?": ("docs/guide.md", ['backend="runlora"', "## Options", "TrainingArguments"]),
    "Did it help?": ("docs/guide.md", ["lora_rewrite.explain(", "**Counters.**"]),
    "What is supported?": ("docs/supported.md", ["| test |", "tests/models/test_families.py"]),
    "How do I add a variant?": ("docs/design.md", ["## How to add a variant", "FORWARDS", "BACKWARDS"]),
}


@pytest.mark.parametrize("question", QUESTIONS)
def test_each_reader_question_is_one_link_from_the_readme(question):
    page, must_hold = QUESTIONS[question]
    lines = [line for line in README.read_text().splitlines() if question in line]
    assert lines, f"the README does not ask {question!r}"
    start = README.read_text().splitlines().index(lines[-1])
    item = "\n".join(README.read_text().splitlines()[start:start + 4]).split("\n- ")[0]
    targets = [t.split("#")[0] for t in re.findall(r"\]\(([^)]+)\)", item)]
    assert page in targets, f"{question!r}: no link to {page} (links: {targets})"
    text = (ROOT / page).read_text()
    for needle in must_hold:
        assert needle in text, f"{page} does not hold {needle!r}"


def test_every_docs_page_is_linked_from_the_readme():
    links = {t.split("#")[0] for t in re.findall(r"\]\(([^)]+)\)", README.read_text())}
    for page in DOCS.glob("*.md"):
        assert f"docs/{page.name}" in links, f"docs/{page.name} is not linked from the README"


# --- links, tests named, paths ----------------------------------------------------------------------

@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_relative_link_resolves(page):
    for target in re.findall(r"\]\(([^)\s]+)\)", outside_fences(page.read_text())):
        if re.match(r"[a-z]+:", target):
            continue
        path, _, anchor = target.partition("#")
        resolved = (page.parent / path).resolve() if path else page
        assert resolved.exists(), f"{page.name}: link to {target} does not resolve"
        if anchor:
            assert resolved.suffix == ".md" and anchor in anchors(resolved), \
                f"{page.name}: {target}: no heading with anchor #{anchor}"


def test_every_test_named_in_supported_is_a_node_id_pytest_collects():
    """Each test supported.md names, exactly as written, is what `pytest --collect-only` collects: a file, a
    test (all its parameters), or one parameterised case."""
    import subprocess
    import sys

    text = (DOCS / "supported.md").read_text()
    named = sorted(set(re.findall(r"`(tests/[\w/]+\.py(?:::\w+(?:\[[^\]`]+\])?)?)`", text)))
    assert len(named) >= 40
    proc = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider",
                           *named], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    collected = {line.strip() for line in proc.stdout.splitlines() if "::" in line}
    for node in named:
        assert node in collected or any(c.startswith(node + ("[" if "::" in node else "::")) for c in collected), \
            f"supported.md names {node}, which pytest does not collect"
    for table in tables(text):
        for row in table:
            if "test" in row and row["test"] != "—":
                assert "tests/" in row["test"], f"supported.md: a row without its test: {row}"


def test_python_blocks_parse():
    for page in PAGES:
        for block in fenced_blocks(page):
            if block.lang == "python":
                ast.parse(block.text, filename=f"{page.name}:{block.line}")


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_no_page_names_a_path_of_one_machine(page):
    machine_path = re.compile(r"(?<![\w.])/(?:work|home|Users|root|mnt|tmp)/[\w.-]")
    found = machine_path.findall(page.read_text())
    assert not found, f"{page.name}: {found[:3]}"
