"""The README's Python API example runs as written, its quick start is exactly two commands that
refer to things that exist (console script, CLI flags, extras, the CI script), every CLI invocation
and relative link in it is real, and the mathematics cited across the repository is shipped in
docs/math.md with every cited section present."""

import importlib
import importlib.util
import re
import sys
from pathlib import Path

import pytest
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
MATH = ROOT / "docs" / "math.md"


def _pyproject() -> dict:
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        tomllib = pytest.importorskip("tomli")
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def _quick_start() -> list[str]:
    block = re.search(r"## Quick start\s+```bash\n(.*?)```", README.read_text(), re.S).group(1)
    return [line for line in block.splitlines() if line.strip()]


def _code_chunks(text: str) -> list[str]:
    """Each line of every fenced block (comments dropped) and every inline `code` span outside them."""
    chunks = []
    for block in re.findall(r"```[^\n]*\n(.*?)```", text, re.S):
        chunks += [line.split(" # ")[0] for line in block.splitlines() if line.strip()]
    prose = re.sub(r"```.*?```", "", text, flags=re.S)
    return chunks + re.findall(r"`([^`\n]+)`", prose)


def _cli_invocations(text: str) -> list[tuple[str, str, str]]:
    """(chunk, subcommand, rest) for every `tiltlm SUB …` / `-m tiltlm.cli SUB …` in the README's code."""
    found = []
    for chunk in _code_chunks(text):
        for m in re.finditer(r"(?:(?<=\s)|^)(?:tiltlm|-m tiltlm\.cli)\s+([a-z][\w-]*)([^&]*)", chunk):
            found.append((chunk, m.group(1), m.group(2)))
    return found


def _click_app():
    import typer

    from tiltlm.cli import app

    return typer.main.get_command(app)


def test_python_api_example_runs_and_is_quiet(tmp_path):
    """The block runs as written in a fresh interpreter and prints only its own results: no transformers progress
    bars ("Loading weights", "Writing model shards") or advisory warnings on stderr (tiltlm.quiet)."""
    import os
    import subprocess

    text = README.read_text()
    block = re.search(r"## Python API\s+```python\n(.*?)```", text, re.S).group(1)
    (tmp_path / "example.py").write_text(block)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    env.pop("TRANSFORMERS_VERBOSITY", None)
    done = subprocess.run([sys.executable, "example.py"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (tmp_path / "tb" / "config.json").is_file()
    assert done.stderr == "", done.stderr[-3000:]
    assert "Estimate(value=" in done.stdout and "n_sequences" in done.stdout


def test_quick_start_is_two_commands_and_ci_runs_the_test_one():
    commands = _quick_start()
    assert len(commands) == 2 and "tiltlm run" in commands[0] and "pytest" in commands[1]
    ci = (README.parent / ".ci" / "run").read_text()
    assert commands[1] in ci
    # ... as a command CI executes, not inside a comment
    assert commands[1] in [line.strip() for line in ci.splitlines() if not line.lstrip().startswith("#")]


def test_quick_start_commands_refer_to_real_things(monkeypatch, capsys):
    pyproject = _pyproject()
    first, second = _quick_start()
    steps = [s.strip() for s in first.split("&&")]
    assert steps == ["pip install torch==2.13.0", "pip install -e .", "tiltlm run"], steps
    assert pyproject["project"]["name"] == "tiltlm"
    # the pinned torch satisfies the package's own torch range, so `pip install -e .` keeps it
    torch_req = next(Requirement(d) for d in pyproject["project"]["dependencies"] if Requirement(d).name == "torch")
    for command in (first, second):
        pin = re.search(r"torch==([\d.]+)", command).group(1)
        assert torch_req.specifier.contains(pin), (pin, str(torch_req))
    # `tiltlm` is the console script, and it is the typer app's entry point
    target = pyproject["project"]["scripts"]["tiltlm"]
    module, func = target.split(":")
    entry = getattr(importlib.import_module(module), func)
    from tiltlm import cli

    assert entry is cli.main
    # `tiltlm run --help` through that entry point succeeds and lists the flags the README documents
    monkeypatch.setenv("COLUMNS", "200")
    monkeypatch.setattr(sys, "argv", ["tiltlm", "run", "--help"])
    try:
        entry()  # success returns (or exits with 0)
    except SystemExit as e:
        assert e.code in (0, None)
    help_text = capsys.readouterr().out
    for flag in ("--reward", "--betas", "--beta", "--budget", "--interactive", "--out"):
        assert flag in help_text, flag
    # the second command installs extras that exist and runs pytest over the configured tests
    assert re.search(r"pip install -e \"\.\[test,similarity\]\"", second)
    assert pyproject["tool"]["pytest"]["ini_options"]["testpaths"] == ["tests"]


def test_every_extra_the_readme_installs_exists():
    pyproject = _pyproject()
    extras = set(pyproject["project"]["optional-dependencies"])
    named = []
    for group in re.findall(r"pip install (?:-e )?\"?(?:\.|tiltlm)\[([^\]]+)\]", README.read_text()):
        named += [e.strip() for e in group.split(",")]
    assert {"test", "similarity", "bench", "ray", "vllm"} <= set(named), named  # the parse finds them
    assert set(named) <= extras, set(named) - extras


def test_every_cli_invocation_in_the_readme_exists_with_its_flags():
    click_app = _click_app()
    invocations = _cli_invocations(README.read_text())
    used = {sub for _, sub, _ in invocations}
    assert {"run", "sweep", "report", "train", "sample", "exact", "testbed", "pretrain", "chat"} <= used, used
    for chunk, sub, rest in invocations:
        assert sub in click_app.commands, f"README runs `tiltlm {sub}`, which the CLI lacks: {chunk!r}"
        command = click_app.commands[sub]
        if hasattr(command, "commands"):  # a group (`tiltlm reward-model train …`): the flags are its subcommand's
            name = rest.split()[0] if rest.split() else ""
            assert name in command.commands, f"README runs `tiltlm {sub} {name}`, which the CLI lacks: {chunk!r}"
            command = command.commands[name]
        options = {o for p in command.params for o in (*p.opts, *p.secondary_opts)}
        for flag in re.findall(r"(?:(?<=\s)|(?<=\[))(--?[A-Za-z][\w-]*)", rest):
            assert flag in options, f"`tiltlm {sub}` has no option {flag} (README: {chunk!r}); it has {sorted(options)}"
    # and the CLI table documents every command the app has
    table = re.search(r"## The CLI\n(.*?)\n## ", README.read_text(), re.S).group(1)
    documented = set(re.findall(r"^\| `tiltlm ([a-z][\w-]*)", table, re.M))
    assert documented == set(click_app.commands), (documented, set(click_app.commands))


def test_python_modules_and_repo_paths_in_the_readme_exist():
    chunks = _code_chunks(README.read_text())
    modules = {m for c in chunks for m in re.findall(r"-m (tiltlm[\w.]*)", c)}
    assert "tiltlm.experiments.tabular" in modules and "tiltlm.cli" in modules
    for module in modules:
        assert importlib.util.find_spec(module) is not None, module
    paths = {
        tok.rstrip(",.;:)")
        for c in chunks for tok in c.split()
        if re.match(r"^(?:src|tests|scripts|benchmarks|configs|docs|\.ci)/", tok)
    }
    assert {"benchmarks/step_throughput.py", "configs/kl_pg_default.yaml", ".ci/run"} <= paths, paths
    missing = sorted(p for p in paths if not (ROOT / p).exists())
    assert not missing, missing


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


@pytest.mark.parametrize("doc", ["README.md", "docs/math.md"])
def test_every_relative_link_resolves(doc):
    path = ROOT / doc
    text = re.sub(r"```.*?```", "", path.read_text(), flags=re.S)
    anchors = {_slug(h) for h in re.findall(r"^#+\s+(.*)$", path.read_text(), re.M)}
    links = re.findall(r"\[[^\]]*\]\(([^)\s]+)\)", text)
    if doc == "README.md":
        assert len(links) >= 5 and "docs/math.md" in links  # the parse sees the links
    for link in links:
        if re.match(r"^[a-z]+:", link):  # http(s), mailto: not ours to check offline
            continue
        target, _, fragment = link.partition("#")
        if not target:
            assert fragment in anchors, f"{doc}: link to #{fragment}, no such heading"
            continue
        assert (path.parent / target).exists(), f"{doc}: link to {link}, which does not exist"


# the citation this repository once used: a file outside it (spelled so this file does not cite it)
_OLD_CITATION = re.compile("MATH" + r"\.md|(?<![\w/.-])" + "shared" + r"/")
_CITED_TREES = ["src", "docs", "scripts", "benchmarks", "tests", "configs"]
_TEXT_SUFFIXES = {".py", ".md", ".txt", ".yaml", ".yml", ".toml", ".cfg", ".sh", ".html", ".css", ".js"}


def _text_files():
    yield README
    for tree in _CITED_TREES:
        for path in sorted((ROOT / tree).rglob("*")):
            if path.is_file() and path.suffix in _TEXT_SUFFIXES and "__pycache__" not in path.parts:
                yield path


def test_nothing_cites_the_unshipped_math_file():
    offenders = []
    for path in _text_files():
        for i, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
            if _OLD_CITATION.search(line):
                offenders.append(f"{path.relative_to(ROOT)}:{i}: {line.strip()}")
    assert not offenders, "cite docs/math.md §N instead:\n" + "\n".join(offenders)


def _math_sections() -> set[str]:
    text = MATH.read_text()
    top = re.findall(r"^## §(\d+) ", text, re.M)
    subs = re.findall(r"^### (\d+\.\d+) ", text, re.M)
    assert top == [str(i) for i in range(1, len(top) + 1)] and len(top) >= 6, top  # numbered 1..N in order
    assert all(s.split(".")[0] in top for s in subs), subs
    return set(top) | set(subs)


def test_every_math_citation_names_a_section_of_docs_math():
    sections = _math_sections()
    cite = re.compile(r"docs/math\.md(?:\]\([^)]*\))?\s*§(\d+(?:\.\d+)?)(?:\s*[–-]\s*(\d+(?:\.\d+)?))?")
    found, bad = 0, []
    for path in _text_files():
        for i, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
            for m in cite.finditer(line):
                found += 1
                for section in filter(None, m.groups()):
                    if section not in sections:
                        bad.append(f"{path.relative_to(ROOT)}:{i}: §{section}")
    assert found >= 20, found  # the repository does cite it: the regex sees those citations
    assert not bad, f"citations of sections docs/math.md lacks (it has {sorted(sections)}):\n" + "\n".join(bad)


def test_quiet_transformers_is_scoped():
    from transformers.utils import logging as hf_logging

    from tiltlm.quiet import quiet_transformers

    before = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_info()
    hf_logging.enable_progress_bar()
    try:
        with quiet_transformers():
            assert hf_logging.get_verbosity() == hf_logging.ERROR and not hf_logging.is_progress_bar_enabled()
        assert hf_logging.get_verbosity() == hf_logging.INFO and hf_logging.is_progress_bar_enabled()  # the caller's settings
    finally:
        hf_logging.set_verbosity(before[0])
        (hf_logging.enable_progress_bar if before[1] else hf_logging.disable_progress_bar)()
