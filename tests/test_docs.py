"""Every command and Python block of README.md and docs/*.md runs here, or says why not and what runs it.

A block is a fenced ```bash, ```python or ```yaml block. A block preceded (blank lines aside) by an HTML
comment is not run here; the comment says why, and which test runs it instead:
`<!-- not run here: needs GPUs; tests/test_distributed_configs.py parses the configs -->`, or
`<!-- run by tests/test_readme.py -->`; every `tests/...py` a comment names must exist. Every other block
runs here, in a temp folder holding a shortened quickstart run (`runs/quickstart/version_0/`: metrics.csv,
a checkpoint, hf_model/), `args.json` (TRL arguments, as `TrainingArguments.to_json_string()` writes them),
and links to the repository's `configs/` and `dpo_lightning/`, so that a block reads as a user would type it
at the repository root after the quickstart:

- python: executed as written.
- bash: every command (a line, or a part between `&&`) must be a `dpo-lightning` command; it runs in this
  process through the console script's `main`, globs expanded as the shell would; `fit` and `validate` get
  SHORT appended (two steps, one validation batch: the full runs take minutes, and
  tests/test_quickstart.py runs the quickstart's learning).
- yaml: a fragment of a fit config: `dpo-lightning fit --config configs/quickstart.yaml --config FRAGMENT`
  with SHORT appended.

A block neither runnable here nor marked fails, naming its file and line. No network.
"""

import glob
import json
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
LANGUAGES = ("bash", "python", "yaml")
SHORT = ["--trainer.max_steps=2", "--trainer.val_check_interval=1", "--trainer.limit_val_batches=1",
         "--trainer.log_every_n_steps=1", "--trainer.enable_progress_bar=false",
         "--trainer.enable_model_summary=false"]
SHORT_VALIDATE = ["--trainer.limit_val_batches=1", "--trainer.enable_progress_bar=false"]
MARK = re.compile(r"<!--\s*(not run here|run by)\b:?(.*?)-->", re.S)
# The set-up lines newcomers copy: kept verbatim; CI runs the test line as it stands.
QUICKSTART_LINE = ("python3 -m venv .venv && . .venv/bin/activate && pip install torch==2.13.0 && pip install -e . && "
                   "dpo-lightning fit --config configs/quickstart.yaml")
TEST_LINE = ("python3 -m venv .venv && . .venv/bin/activate && pip install torch==2.13.0 && "
             "pip install -e \".[test]\" && pytest")
TRL_ARGS = {"model_name_or_path": "gpt2", "dataset_name": "Anthropic/hh-rlhf", "beta": 0.1, "learning_rate": 5e-7,
            "per_device_train_batch_size": 8, "gradient_accumulation_steps": 1, "warmup_steps": 150,
            "max_steps": 1000, "bf16": True, "optim": "rmsprop", "logging_steps": 5, "eval_steps": 500,
            "eval_strategy": "steps", "output_dir": "runs"}


class Block:
    def __init__(self, page: Path, line: int, language: str, code: str, mark: tuple[str, str] | None):
        self.page, self.line, self.language, self.code, self.mark = page, line, language, code, mark

    @property
    def where(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.line}"


def blocks_of(page: Path) -> list[Block]:
    """The page's fenced bash/python/yaml blocks, each with the HTML comment right before it, if any."""
    lines = page.read_text().split("\n")
    found, i = [], 0
    while i < len(lines):
        opening = re.match(r"^(\s*)```(\w*)\s*$", lines[i])
        if not opening:
            i += 1
            continue
        indent, language = opening.groups()
        end = next(j for j in range(i + 1, len(lines)) if lines[j].strip() == "```")
        if language in LANGUAGES:
            code = "\n".join(line[len(indent):] for line in lines[i + 1:end]) + "\n"
            before = "\n".join(lines[:i]).rstrip()
            mark = None
            if before.endswith("-->"):
                comment = before[before.rindex("<!--"):]
                match = MARK.fullmatch(comment)
                mark = (match.group(1), match.group(2).strip()) if match else ("unreadable", comment)
            found.append(Block(page, i + 1, language, code, mark))
        i = end + 1
    return found


BLOCKS = [block for page in PAGES for block in blocks_of(page)]
TO_RUN = [block for block in BLOCKS if block.mark is None]
MARKED = [block for block in BLOCKS if block.mark is not None]


def commands(code: str) -> list[list[str]]:
    """A bash block's commands, as argument lists: lines joined at trailing backslashes, comments dropped, split
    at `&&`."""
    out = []
    for line in code.replace("\\\n", " ").split("\n"):
        words = shlex.split(line, comments=True)
        while words:
            cut = words.index("&&") if "&&" in words else len(words)
            out.append(words[:cut])
            words = words[cut + 1:]
    return out


def expand(word: str) -> list[str]:
    """A word with a glob in it, as the shell expands it (unchanged when nothing matches)."""
    return sorted(glob.glob(word)) or [word] if any(c in word for c in "*?[") else [word]


def dpo_lightning(argv: list[str]) -> None:
    """The console script, in this process: a SystemExit of 0 (help, --print_config) is a success."""
    from dpo_lightning.cli import main

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(sys, "argv", ["dpo-lightning", *argv])  # as the console script sees it
        try:
            main()
        except SystemExit as stop:
            if stop.code not in (0, None):
                raise AssertionError(f"`dpo-lightning {shlex.join(argv)}` exited with {stop.code}") from None


def shortened(argv: list[str]) -> list[str]:
    if "--print_config" in argv or "-h" in argv or "--help" in argv:
        return argv
    return argv + {"fit": SHORT, "validate": SHORT_VALIDATE}.get(argv[0], [])


@pytest.fixture(scope="session")
def quickstart_run(tmp_path_factory) -> Path:
    """A folder holding `runs/quickstart/version_0` of a shortened quickstart: what the pages' commands read."""
    folder = tmp_path_factory.mktemp("after_quickstart")
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(folder)
        dpo_lightning(["fit", "--config", str(ROOT / "configs" / "quickstart.yaml"), *SHORT])
    assert list((folder / "runs" / "quickstart" / "version_0" / "checkpoints").glob("*.ckpt"))
    return folder


@pytest.fixture
def workdir(quickstart_run, tmp_path, monkeypatch) -> Path:
    shutil.copytree(quickstart_run / "runs", tmp_path / "runs")
    for name in ("configs", "dpo_lightning"):
        (tmp_path / name).symlink_to(ROOT / name)
    (tmp_path / "args.json").write_text(json.dumps(TRL_ARGS))
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.mark.parametrize("block", TO_RUN, ids=[block.where for block in TO_RUN])
def test_block_runs(block, workdir):
    if block.language == "python":
        exec(compile(block.code, block.where, "exec"), {"__name__": "__main__"})
    elif block.language == "yaml":
        (workdir / "fragment.yaml").write_text(block.code)
        dpo_lightning(shortened(["fit", "--config", "configs/quickstart.yaml", "--config", "fragment.yaml"]))
    else:
        for argv in commands(block.code):
            if argv[0] != "dpo-lightning":
                pytest.fail(f"{block.where}: `{shlex.join(argv)}` cannot run here: run it in tests/test_docs.py, or "
                            "put `<!-- not run here: WHY; the test that runs it instead -->` before the block")
            dpo_lightning(shortened([word for arg in argv[1:] for word in expand(arg)]))


@pytest.mark.parametrize("block", MARKED, ids=[block.where for block in MARKED])
def test_a_block_not_run_here_says_why_and_names_tests_that_exist(block):
    kind, text = block.mark
    assert kind in ("not run here", "run by"), f"{block.where}: unreadable comment {text!r}"
    assert text, f"{block.where}: `<!-- {kind}: -->` without a reason"
    named = re.findall(r"tests/[\w/]+\.py", text)
    assert kind == "not run here" or named, f"{block.where}: `run by` names no tests/...py file"
    missing = [name for name in named if not (ROOT / name).is_file()]
    assert not missing, f"{block.where}: names {missing}, which do not exist"


def test_the_pages_have_blocks_to_check():
    assert len(BLOCKS) >= 30 and {block.language for block in TO_RUN} == set(LANGUAGES)


def test_the_setup_lines_are_in_the_readme_verbatim_and_ci_runs_the_test_line():
    readme = (ROOT / "README.md").read_text().split("\n")
    assert QUICKSTART_LINE in readme and TEST_LINE in readme
    assert TEST_LINE in (ROOT / ".ci" / "run").read_text().split("\n")


def test_the_readme_is_a_five_minute_read():
    assert len((ROOT / "README.md").read_text().split("\n")) <= 250


def test_user_facing_pages_tell_no_project_history():
    history = re.compile(r"\bissues?[ -]#?\d+|\b(this|the last|the previous) round\b", re.I)
    found = [f"{page.relative_to(ROOT)}:{n}: {line.strip()}" for page in PAGES
             for n, line in enumerate(page.read_text().split("\n"), 1) if history.search(line)]
    assert not found, "\n".join(found)


def test_what_the_pages_commands_the_notebooks_and_the_end_of_a_run_write_in_the_repository_is_git_ignored():
    # A newcomer following the README from the repository root left curves.png, sort-dpo/, mine.yaml, ... as
    # untracked files in `git status`.
    if not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    written = {"runs/quickstart/version_0/metrics.csv", "my_model/model.safetensors", "args.json"}  # fit; the end
    for block in BLOCKS:  # of a run's suggested export; the TRL arguments that from-trl reads (docs/trl.md)
        written |= {m for m in re.findall(r"--(?:out|output_dir) ([\w./-]+)", block.code) if not m.startswith("/")}
    written.discard("docs/quickstart_curves.png")  # committed on purpose: the README shows it
    for notebook in (ROOT / "notebooks").glob("*.ipynb"):  # run from notebooks/, the folder they sit in
        code = "".join("".join(cell["source"]) for cell in json.loads(notebook.read_text())["cells"])
        written |= {f"notebooks/{m}" for m in re.findall(
            r'(?:plot_metrics\([^,]+, |ExportPretrained\(|CSVLogger\(|Path\()"([^"]+)"', code)}
    assert {"curves.png", "sort-dpo", "mine.yaml", "notebooks/curves.png", "notebooks/hf_model"} <= written
    # A file below each: ignored when the output itself is, as a file or a folder (`hf_model/` matches folders only).
    done = subprocess.run(["git", "check-ignore", "--no-index", "--verbose", "--non-matching",
                           *sorted(f"{path}/a-file" for path in written)], cwd=ROOT, capture_output=True, text=True)
    not_ignored = [line.split("\t")[1].removesuffix("/a-file") for line in done.stdout.splitlines()
                   if line.startswith("::")]
    assert not_ignored == [], f"not git-ignored: {not_ignored}"
