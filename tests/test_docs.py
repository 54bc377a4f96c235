"""The README and the user guide (docs/) stay true: the site builds, its links hold, its commands run.

- The site builds with ``mkdocs build --strict`` (mkdocs.yml: a link to a missing page, a missing
  ``#anchor`` or a page left out of the nav is an error), and a broken link or anchor does fail it.
- Every fenced ``bash``/``sh``/``python`` block of README.md and docs/*.md runs, in order per page,
  in a scratch folder (a copy of ``jobs/``, a link to this checkout's ``.venv``, the venv's ``bin/``
  first on PATH). A block that cannot run here has ``<!-- not-run: reason -->`` on the line before
  it; ``<!-- file: NAME -->`` writes the block to NAME instead of running it. The README runs first
  (its walkthrough renders ``out/my-job``); the docs pages run on a copy of its folder.
- Every ``yaml`` block that is a job spec (top-level ``input`` and ``output``) loads with
  :mod:`batchgen.spec`.
- The README stays short (<= 250 lines) and keeps the two set-up commands.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
DOCS = REPO / "docs"
VENV = REPO / ".venv"
PAGES = [README] + sorted(DOCS.glob("*.md"))
RUNNABLE = {"bash", "sh", "python"}
BLOCK_TIMEOUT_S = 300

FENCE = re.compile(r"^```([\w+-]*)\s*$")
DIRECTIVE = re.compile(r"^<!--\s*(not-run|file):\s*(.*?)\s*-->\s*$")


@dataclass
class Block:
    page: Path
    line: int           # 1-based line of the opening fence
    lang: str
    text: str
    not_run: str | None = None
    file: str | None = None

    def where(self) -> str:
        return f"{self.page.relative_to(REPO)}:{self.line}"


def blocks(page: Path) -> list[Block]:
    """The fenced code blocks of a Markdown page (fences at column 0), with their directive."""
    lines = page.read_text().splitlines()
    out: list[Block] = []
    i = 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        start = i
        j = i + 1
        while j < len(lines) and lines[j].rstrip() != "```":
            j += 1
        assert j < len(lines), f"{page}:{start + 1}: unclosed code fence"
        block = Block(page, start + 1, m.group(1).lower(), "\n".join(lines[start + 1:j]) + "\n")
        prev = start - 1
        while prev >= 0 and not lines[prev].strip():
            prev -= 1
        d = DIRECTIVE.match(lines[prev]) if prev >= 0 else None
        if d:
            if d.group(1) == "not-run":
                block.not_run = d.group(2)
            else:
                block.file = d.group(2)
        out.append(block)
        i = j + 1
    return out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(ray_tmp: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "RAY_", "BATCHGEN_TEST"))}
    env.update({
        "PATH": f"{VENV / 'bin'}{os.pathsep}{env.get('PATH', '')}",
        "VIRTUAL_ENV": str(VENV),
        "PYTHONPATH": str(REPO),
        "RAY_TMPDIR": ray_tmp,
        "RAY_USAGE_STATS_ENABLED": "0",
        "RAY_ENABLE_UV_RUN_RUNTIME_ENV": "0",
        "AWS_EC2_METADATA_DISABLED": "true",
        "AWS_CONFIG_FILE": "/nonexistent/batchgen-docs-aws-config",
        "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent/batchgen-docs-aws-credentials",
        "NO_MKDOCS_2_WARNING": "1",
    })
    return env


def _scratch(root: Path) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    shutil.copytree(REPO / "jobs", root / "jobs")
    (root / ".venv").symlink_to(VENV)
    return root


def run_page(page: Path, workdir: Path) -> list[str]:
    """Run the page's runnable blocks in order in ``workdir``; returns what ran (for the log)."""
    ran = []
    port = _free_port()  # the README's local S3 on a free port instead of 9000
    ray_tmp = tempfile.mkdtemp(prefix="bgd-")  # short: Ray's socket paths live below it
    try:
        for block in blocks(page):
            if block.file:
                (workdir / block.file).write_text(block.text)
                continue
            if block.lang not in RUNNABLE or block.not_run is not None:
                continue
            text = block.text.replace("127.0.0.1:9000", f"127.0.0.1:{port}").replace("-p 9000", f"-p {port}")
            if block.lang == "python":
                script = workdir / f".block-{block.line}.py"
                script.write_text(text)
                cmd = [str(VENV / "bin" / "python"), str(script)]
            else:
                cmd = ["bash", "-euo", "pipefail", "-c", text]
            proc = subprocess.Popen(cmd, cwd=workdir, env=_env(ray_tmp), stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, text=True, start_new_session=True)
            try:
                out, err = proc.communicate(timeout=BLOCK_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                out, err = proc.communicate()
                pytest.fail(f"{block.where()}: timed out after {BLOCK_TIMEOUT_S} s\n{block.text}\n{err[-3000:]}")
            finally:  # background processes a block started (the README's moto server)
                try:
                    os.killpg(proc.pid, signal.SIGTERM)
                except (ProcessLookupError, PermissionError):
                    pass
            assert proc.returncode == 0, (f"{block.where()}: exit {proc.returncode}\n--- block\n{block.text}"
                                          f"--- stdout\n{out[-3000:]}\n--- stderr\n{err[-5000:]}")
            ran.append(block.where())
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    return ran


@pytest.fixture(scope="module")
def walkthrough(tmp_path_factory):
    """The README's blocks run in a scratch folder; the docs pages start from a copy of it."""
    root = _scratch(tmp_path_factory.mktemp("readme") / "work")
    ran = run_page(README, root)
    return root, ran


# ----------------------------------------------------------------------------- the README


def test_readme_is_short_and_keeps_the_setup_commands():
    text = README.read_text()
    assert len(text.splitlines()) <= 250, "README.md is for the first ten minutes: move the rest into docs/"
    lines = [line.strip() for line in text.splitlines()]
    assert any(line.startswith("make demo ") or line == "make demo" for line in lines)
    assert any(line.startswith("make test ") or line == "make test" for line in lines)
    for heading in ("## Render my own prompts", "## Built-in models", "## Local S3 in five lines",
                    "## What is in the output", "## Why a run takes some seconds to start", "## Where the rest is"):
        assert heading in text, heading


def test_readme_links_point_at_files_that_exist():
    for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", README.read_text()):
        if "://" not in target:
            assert (REPO / target).exists(), f"README links to {target}, which does not exist"


def test_readme_builtins_are_the_registry():
    try:
        from batchgen.builtin import BUILTINS
    except ImportError:  # before the registry moved out of tiny/
        from batchgen.tiny import BUILTINS

    documented = set(re.findall(r"`builtin:([\w-]+)`", README.read_text()))
    assert documented == set(BUILTINS), f"README lists {sorted(documented)}, the registry has {sorted(BUILTINS)}"


def test_readme_commands_run(walkthrough):
    root, ran = walkthrough
    assert ran, "no README block ran"
    assert (root / "out" / "my-job" / "manifest.parquet").is_file()


# ----------------------------------------------------------------------------- the docs


@pytest.mark.parametrize("page", sorted(p.name for p in DOCS.glob("*.md")))
def test_docs_commands_run(page, walkthrough, tmp_path):
    base, _ = walkthrough
    root = _scratch(tmp_path / "work")
    shutil.copytree(base / "out", root / "out", symlinks=True)
    for name in ("prompts.parquet", "my-job.yaml"):
        shutil.copy(base / name, root / name)
    run_page(DOCS / page, root)


def test_every_block_is_runnable_or_says_why_not():
    for page in PAGES:
        for block in blocks(page):
            if block.not_run is not None:
                assert len(block.not_run) >= 10, f"{block.where()}: not-run needs a reason"
                for ref in re.findall(r"tests/[\w/]+\.py(?:::\w+)?", block.not_run):
                    path, _, name = ref.partition("::")
                    assert (REPO / path).is_file(), f"{block.where()}: {path} does not exist"
                    assert not name or f"def {name}(" in (REPO / path).read_text(), f"{block.where()}: {ref}"
            if block.lang in ("console", "shell", "shell-session", "zsh"):
                pytest.fail(f"{block.where()}: fence commands as bash (run) or text (synopsis)")


def test_spec_snippets_load():
    from batchgen.spec import spec_from_dict

    specs = 0
    for page in PAGES:
        for block in blocks(page):
            if block.lang not in ("yaml", "yml"):
                continue
            data = yaml.safe_load(block.text)
            if isinstance(data, dict) and "input" in data and "output" in data:
                spec_from_dict(data, source=block.where())
                specs += 1
    assert specs >= 2


# ----------------------------------------------------------------------------- the site


def _mkdocs_build(config: Path, site: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-f", str(config), "-d", str(site)],
                          capture_output=True, text=True, timeout=300, env=_env(tempfile.gettempdir()))


def test_site_builds_strict(tmp_path):
    proc = _mkdocs_build(REPO / "mkdocs.yml", tmp_path / "site")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    assert (tmp_path / "site" / "index.html").is_file() and (tmp_path / "site" / "architecture" / "index.html").is_file()
    config = yaml.safe_load((REPO / "mkdocs.yml").read_text().replace("!!python", "#"))
    listed = set(re.findall(r"[\w-]+\.md", yaml.safe_dump(config["nav"])))
    assert listed == {p.name for p in DOCS.glob("*.md")}


@pytest.mark.parametrize("broken", ["[gone](no-such-page.md)", "[gone](jobs.md#no-such-anchor)",
                                    "[gone](#no-such-heading)"], ids=["link", "anchor", "local-anchor"])
def test_broken_link_or_anchor_fails_the_build(tmp_path, broken):
    shutil.copytree(DOCS, tmp_path / "docs")
    shutil.copy(REPO / "mkdocs.yml", tmp_path / "mkdocs.yml")
    index = tmp_path / "docs" / "index.md"
    index.write_text(index.read_text() + f"\nSee {broken}.\n")
    proc = _mkdocs_build(tmp_path / "mkdocs.yml", tmp_path / "site")
    assert proc.returncode != 0, f"mkdocs --strict accepted {broken}"
    target = broken.split("(")[1].rstrip(")")
    assert target.split("#")[-1] in proc.stdout + proc.stderr
