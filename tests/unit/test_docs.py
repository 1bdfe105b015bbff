"""Every command shown in README.md and docs/**/*.md works as documented.

Commands come from the fenced code blocks (bash, sh, console or no language): the lines after
``$ `` where a block uses prompts, else every line (in a block without a language, only lines
that start with a known program; the rest is output). ``moe-merge`` commands go through the
real ``moe_merge.cli.main`` with its subcommand handlers replaced by a recorder (``dry-run``
really dry-runs); training commands (``python -m moe_merge.train``, ``./launch/train.sh``,
``deepspeed ... --module moe_merge.train``) load and dry-run their recipe with its overrides in
this process; ``./launch/*.sh`` must be executable; anything else must be in ``OTHER``, with the
reason it is not run. A path into the repository (``recipes/...``, ``bench/...``) must exist.
"""

from __future__ import annotations

import argparse
import ast
import fnmatch
import os
import re
import shlex
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PAGES = [REPO / "README.md", *sorted((REPO / "docs").rglob("*.md"))]
SHELL = {"", "bash", "sh", "shell", "console"}

# Programs the docs show that this test does not run, and why.
OTHER = {
    "pip": "installs packages: the environment, not this project's interface",
    "tensorboard": "TensorBoard's own command line, reading the runs' tb/ directories",
    "git": "version control",
    "cd": "shell builtin",
    "export": "shell builtin",
    "source": "shell builtin (activates the virtualenv the set-up made)",
    "cp": "copies a file the user then edits (launch/hostfile from launch/hostfile.example)",
    "tail": "a filter at the end of a pipe",
    "head": "a filter at the end of a pipe",
    "grep": "a filter at the end of a pipe",
    "nvidia-smi": "the GPU driver's tool",
}
# Files a command may name that the user creates (they are not in the repository).
USER_FILES = {"launch/hostfile": "the user's copy of launch/hostfile.example"}
# Directories the project's own commands write into (git-ignored, absent in a fresh clone).
OUTPUT_DIRS = {"bench/out": "what the benchmarks write and cache"}
# First path components that mean "a file of this repository".
REPO_DIRS = ("recipes", "launch", "ds_configs", "bench", "tests", "moe_merge", "docs")
PLACEHOLDER = re.compile(r"^(?:[A-Z][A-Z0-9_]*|\.\.\.|.*<.*>.*)$")  # RUN, CKPT, DIR, <...>, ...
ANGLE = re.compile(r"<[A-Za-z][^<>\n]*>")
ENV = re.compile(r"^[A-Z_][A-Z0-9_]*=")


def _repository_files() -> set[str] | None:
    """The files git tracks and their directories, or None outside a git checkout.

    A path must be in the repository, not just on this disk: a run output left in the working
    tree would otherwise pass here and fail in a fresh clone.
    """
    try:
        top = subprocess.run(["git", "rev-parse", "--show-toplevel"], cwd=REPO,
                             capture_output=True, text=True, check=True).stdout.strip()
        if Path(top).resolve() != REPO:  # unpacked inside another repository's work tree
            return None
        out = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return None
    files = {f for f in out.stdout.decode().split("\0") if f}
    if not files:
        return None
    dirs = {str(parent) for f in files for parent in Path(f).parents if str(parent) != "."}
    return files | dirs


TRACKED = _repository_files()


def in_repository(path: str) -> bool:
    """``path`` (relative, maybe with a trailing / or a glob) names a file of the repository."""
    path = path.rstrip("/")
    head, sep, tail = path.partition("/")
    if (REPO / head).is_symlink():  # ds_configs -> moe_merge/config/ds_configs
        path = str((REPO / head).resolve().relative_to(REPO)) + sep + tail
    if any(path == d or path.startswith(d + "/") for d in OUTPUT_DIRS):
        return True
    if TRACKED is None:
        return bool(list(REPO.glob(path))) if "*" in path else (REPO / path).exists()
    if "*" in path:  # as Path.glob: a * stays within one directory
        parts = path.split("/")
        return any(len(f.split("/")) == len(parts)
                   and all(map(fnmatch.fnmatchcase, f.split("/"), parts)) for f in TRACKED)
    return path in TRACKED


@dataclass(frozen=True)
class Command:
    page: str
    line: int
    text: str

    def __str__(self) -> str:
        return f"{self.page}:{self.line}"


def _program(word: str) -> str:
    name = word.removeprefix(".venv/bin/").removeprefix("./")
    return "python" if name in ("python", "python3") else name


def _known(first: str) -> bool:
    prog = _program(first)
    return prog in ("moe-merge", "python", "deepspeed", "bash") or prog in OTHER \
        or re.match(r"^launch/[\w.-]+\.sh$", prog) is not None


def _first_word(text: str) -> str:
    words = [w for w in text.split() if not ENV.match(w)]
    return words[0] if words else ""


def extract(page: Path, root: Path = REPO) -> list[Command]:
    """The commands of the shell code blocks of one Markdown page."""
    rel = str(page.relative_to(root))
    lines = page.read_text().splitlines()
    commands: list[Command] = []
    i = 0
    while i < len(lines):
        m = re.match(r"^(\s*)(```+|~~~+)\s*([\w-]*)", lines[i])
        if not m:
            i += 1
            continue
        indent, fence, lang = len(m.group(1)), m.group(2), m.group(3).lower()
        start, i = i + 1, i + 1
        while i < len(lines) and not lines[i].strip().startswith(fence):
            i += 1
        body = [(n + 1, line[indent:] if line[:indent].isspace() else line.lstrip())
                for n, line in enumerate(lines[start:i], start)]
        i += 1
        if lang not in SHELL:
            continue
        prompts = any(text.startswith("$ ") for _, text in body)
        k = 0
        while k < len(body):
            n, text = body[k]
            k += 1
            if prompts:
                if not text.startswith("$ "):
                    continue
                text = text[2:]
            while text.rstrip().endswith("\\") and k < len(body):
                text = text.rstrip()[:-1].rstrip() + " " + body[k][1].strip()
                k += 1
            if not text.strip() or text.lstrip().startswith("#"):
                continue
            if lang == "" and not prompts and not _known(_first_word(text)):
                continue  # output shown in a block without a language
            commands.append(Command(rel, n, text.strip()))
    return commands


COMMANDS = [c for page in PAGES for c in extract(page)]


def _split(text: str) -> list[list[str]]:
    """Words of each simple command of a pipeline or list (``|``, ``&&``, ``;``)."""
    lex = shlex.shlex(ANGLE.sub("PLACEHOLDER", text), posix=True, punctuation_chars=True)
    lex.whitespace_split, lex.commenters = True, "#"
    segments, current = [], []
    for word in lex:
        if word in ("|", "&&", ";", "||"):
            segments.append(current)
            current = []
        elif set(word) <= set("<>&"):
            raise AssertionError(f"redirection {word!r}: show the command without it")
        else:
            current.append(word)
    return [s for s in [*segments, current] if s]


def _check_paths(words) -> None:
    for word in words:
        value = word.split("=", 1)[1] if "=" in word else word
        value = value.rstrip(",")
        if value.split("/", 1)[0] in REPO_DIRS and "/" in value and value not in USER_FILES:
            assert in_repository(value), f"{value}: no such file in the repository"


class Checker:
    """Runs the checks of one command; pytest's ``capsys``, ``monkeypatch`` and ``tmp_path``."""

    def __init__(self, capsys, monkeypatch, tmp_path: Path):
        self.capsys, self.monkeypatch, self.tmp = capsys, monkeypatch, tmp_path
        monkeypatch.chdir(REPO)

    def check(self, text: str) -> None:
        for words in _split(text):
            self.simple(words)

    def simple(self, words: list[str]) -> None:
        while words and ENV.match(words[0]):
            words = words[1:]
        words = [w for w in words if w != "..."]
        prog, args = _program(words[0]), words[1:]
        if prog == "bash" and args and args[0].startswith("launch/"):
            prog, args = args[0], args[1:]
        if prog == "moe-merge":
            return self.cli(args)
        if prog == "python":
            return self.python(args)
        if prog == "deepspeed":
            return self.deepspeed(args)
        if prog.startswith("launch/"):
            script = REPO / prog
            assert script.is_file(), f"{prog}: no such script"
            assert os.access(script, os.X_OK), f"{prog}: not executable"
            if prog == "launch/train.sh":
                return self.train(args)
            return _check_paths(args)
        assert prog in OTHER, f"{prog}: not a program this test knows; add it to OTHER with why"

    def python(self, args: list[str]) -> None:
        if args[:2] in (["-m", "moe_merge"], ["-m", "moe_merge.cli"]):
            return self.cli(args[2:])
        if args[:2] == ["-m", "moe_merge.train"]:
            return self.train(args[2:])
        if args[:2] == ["-m", "pytest"]:
            return _check_paths(args[2:])
        assert args and args[0].endswith(".py"), f"python {' '.join(args)}: not a known module"
        return self.script(args[0], args[1:])

    def script(self, path: str, args: list[str]) -> None:
        """A script of the repository, and the options it is given are options it defines."""
        assert in_repository(path) and (REPO / path).is_file(), f"{path}: no such script"
        tree = ast.parse((REPO / path).read_text())
        defined = {a.value for node in ast.walk(tree) if isinstance(node, ast.Call)
                   and getattr(node.func, "attr", "") == "add_argument"
                   for a in node.args if isinstance(a, ast.Constant)}
        for word in args:
            if word.startswith("--"):
                assert word.split("=", 1)[0] in defined, f"{path}: no option {word}"
        _check_paths(args)

    def deepspeed(self, args: list[str]) -> None:
        from deepspeed.launcher.runner import parse_args

        _check_paths(args)
        try:
            launcher = parse_args(args)
        except SystemExit as e:
            raise AssertionError(f"the deepspeed launcher refuses {args}: exit {e.code}") from None
        if not launcher.module:
            return self.script(launcher.user_script, launcher.user_args)
        if launcher.user_script == "moe_merge.train":
            return self.train(launcher.user_args)
        assert launcher.user_script == "moe_merge.cli", f"--module {launcher.user_script}"
        return self.cli(launcher.user_args)

    def train(self, args: list[str]) -> None:
        """``moe_merge.train ARGS``: parsed, then the recipe and overrides dry-run."""
        from moe_merge import train

        args = [self.substitute(a) for a in args]
        _check_paths(args)
        try:
            parsed = train.parse_args(args)
        except SystemExit as e:
            raise AssertionError(f"moe_merge.train refuses {args}: exit {e.code}") from None
        if PLACEHOLDER.match(parsed.recipe):
            args[args.index(parsed.recipe)] = "recipes/moe_tiny.yaml"
        rc = train.main([*args, *([] if parsed.dry_run else ["--dry-run"])])
        err = self.capsys.readouterr().err
        assert rc == 0, f"dry run of {args}: exit {rc}: {err.strip()[-500:]}"

    def substitute(self, word: str) -> str:
        """A run or checkpoint named by train.fork_from / train.init_from: a directory in tmp."""
        key, eq, value = word.partition("=")
        if eq and key in ("train.fork_from", "train.init_from"):
            name = "global_step1" if PLACEHOLDER.match(value) else value.strip("/")
            path = self.tmp / "placeholder" / name
            path.mkdir(parents=True, exist_ok=True)
            return f"{key}={path}"
        return word

    def cli(self, args: list[str]) -> None:
        """``moe-merge ARGS`` through the real main(): parsed (dry-run runs), nothing merged."""
        from moe_merge import cli

        seen = []
        sub = next(a for a in cli.build_parser()._actions
                   if isinstance(a, argparse._SubParsersAction))
        for command in sub.choices:
            if command == "dry-run":
                continue  # runs for real: a dry run of the recipe
            name = "_" + command.replace("-", "_")
            assert hasattr(cli, name), f"moe_merge.cli has no handler {name} to stand in for"
            self.monkeypatch.setattr(cli, name, lambda a, name=name: seen.append((name, a)) or 0)
        if args[:1] == ["dry-run"] and len(args) > 1 and PLACEHOLDER.match(args[1]):
            args = ["dry-run", "recipes/moe_tiny.yaml", *args[2:]]
        _check_paths(args)
        try:
            rc = cli.main(args)
        except SystemExit as e:
            err = self.capsys.readouterr().err.strip().splitlines()
            assert e.code == 0, f"moe-merge {' '.join(args)}: {err[-1] if err else e.code}"
            return
        err = self.capsys.readouterr().err
        assert rc == 0, f"moe-merge {' '.join(args)}: exit {rc}: {err.strip()[-500:]}"
        for name, ns in seen:
            if name == "_study" and not PLACEHOLDER.match(ns.recipe):
                from moe_merge.errors import MoeMergeError
                from moe_merge.studies.anneal import load_study
                from moe_merge.studies.stability import PMAInitStudy, SpikeStudy

                load = {"anneal": {}, "pma-init": PMAInitStudy.LOAD, "spike": SpikeStudy.LOAD}
                try:
                    load_study(ns.recipe, ns.overrides, ns.quick, **load[ns.kind])
                except MoeMergeError as e:
                    raise AssertionError(f"study {ns.kind} {ns.recipe}: {e}") from None


@pytest.fixture
def checker(capsys, monkeypatch, tmp_path) -> Checker:
    return Checker(capsys, monkeypatch, tmp_path)


@pytest.mark.parametrize("command", COMMANDS, ids=str)
def test_documented_command_works(command: Command, checker: Checker):
    try:
        checker.check(command.text)
    except Exception as e:
        raise AssertionError(f"{command}: {command.text}\n  {type(e).__name__}: {e}") from None


def test_every_page_and_kind_of_command_is_covered():
    pages = {c.page for c in COMMANDS}
    assert "README.md" in pages and len([c for c in COMMANDS if c.page == "README.md"]) >= 8
    for name in ("training", "merging", "analyze", "studies/anneal", "studies/pma-init",
                 "studies/spike", "benchmarks"):
        assert f"docs/{name}.md" in pages, f"docs/{name}.md: no command found"
    firsts = {_program(_first_word(c.text)) for c in COMMANDS}
    assert {"moe-merge", "python", "deepspeed", "launch/train.sh", "launch/quickstart.sh",
            "launch/test.sh"} <= firsts, firsts


@pytest.mark.parametrize("text, needle", [
    ("moe-merge merge RUN --out DIR --no-such-option", "no-such-option"),
    ("moe-merge merge RUN --last N --out DIR", "--last"),
    ("moe-merge study anneal recipes/study_anneal_tiny.yaml study.nope=1", "study.nope"),
    ("moe-merge dry-run recipes/moe_tiny.yaml parallel.ep_size=3", "ep_size"),
    ("python -m moe_merge.train recipes/no_such_recipe.yaml", "no_such_recipe"),
    ("./launch/train.sh recipes/moe_tiny.yaml train.no_such_key=1", "no_such_key"),
    ("deepspeed --num_gpus 2 --module moe_merge.train recipes/moe_tiny.yaml model.arch=gpt5",
     "gpt5"),
    ("deepspeed --module moe_merge.cli merge RUN --out DIR --strategy mean", "strategy"),
    ("./launch/no_such_script.sh", "no_such_script"),
    (".venv/bin/python bench/merge_bench.py --no-such-option", "no-such-option"),
    ("moe-merge eval runs/x --recipe recipes/gone.yaml", "recipes/gone.yaml"),
    ("rm -rf runs", "rm"),
])
def test_a_broken_command_fails(text, needle, checker: Checker):
    with pytest.raises(AssertionError) as e:
        checker.check(text)
    assert needle in str(e.value) or needle in checker.capsys.readouterr().err, str(e.value)


def test_extraction_reads_prompts_continuations_and_skips_output(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("\n".join([
        "```console", "$ moe-merge inspect RUN \\", "    --json", "tags: 4", "```",
        "```", "runs/<name>/", "moe-merge eval DIR   # the loss", "```",
        "- a list item:", "  ```bash", "  # a comment", "  ./launch/train.sh R.yaml \\",
        "      train.lr=1e-3", "  ```", "```python", "moe-merge merge", "```"]) + "\n")
    got = [(c.line, c.text) for c in extract(page, tmp_path)]
    assert got == [(2, "moe-merge inspect RUN --json"), (8, "moe-merge eval DIR   # the loss"),
                   (13, "./launch/train.sh R.yaml train.lr=1e-3")]


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(REPO)))
def test_links_and_images_resolve(page: Path):
    """Relative links and images point at files, and #anchors at headings of the page."""
    text = page.read_text()
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"^[a-z]+:", target):
            continue
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        assert dest.exists(), f"{page.name}: link to {target}: no such file"
        if anchor and dest.suffix == ".md":
            assert anchor in _anchors(dest), f"{page.name}: link to {target}: no such heading"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(REPO)))
def test_repository_paths_named_in_the_text_exist(page: Path):
    """A `recipes/...`, `moe_merge/...`, `tests/...` (etc.) in backticks names a real file."""
    names = re.findall(rf"`((?:{'|'.join(REPO_DIRS)})/[^`\s]*)`", page.read_text())
    for name in names:
        path = name.split(":", 1)[0]
        if "<" in path or path in USER_FILES:
            continue
        assert in_repository(path), f"{page.name}: `{name}`: no such file in the repository"


def _anchors(page: Path) -> set[str]:
    """GitHub's anchors of the headings of a Markdown page."""
    out = set()
    for heading in re.findall(r"^#+\s+(.*)$", page.read_text(), flags=re.M):
        slug = re.sub(r"[^\w\- ]", "", heading.strip().lower().replace("`", ""))
        out.add(slug.replace(" ", "-"))
    return out


def test_architecture_names_every_module():
    """docs/architecture.md lists each module of the package, by its file name in its section."""
    text = (REPO / "docs" / "architecture.md").read_text()
    modules = [p for p in (REPO / "moe_merge").rglob("*.py")
               if p.name != "__init__.py" and "__pycache__" not in p.parts]
    missing = [str(p.relative_to(REPO)) for p in modules
               if f"`{p.name}`" not in text and f"`{p.relative_to(REPO)}`" not in text]
    assert not missing, f"docs/architecture.md does not describe {missing}"
