"""Every shell command in the README runs as written from a fresh clone.

The fenced ``bash``/``sh`` blocks of README.md are run, block by block and in order, by bash in
a copy of the repository's tracked files (a clone of the working tree), with a PATH that does not
hold the virtualenv: a command that only works once `.venv` is activated fails here. Blocks that
install or measure for minutes (`make demo`, `make test`, the benchmarks) are marked ``slow``
and run only with ``FLYWHEEL_README_LONG=1`` (`make test` is one of them); the fast run stands
their effect in with the project's own virtualenv (a link) and a short `flywheel demo`. The
`flywheel serve` block runs in the background, on a free port instead of the one written, for
the curl blocks.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SHELL_FENCES = ("bash", "sh", "shell")
LONG = re.compile(r"^\s*(make\b|\.venv/bin/python benchmarks/)")
SERVE = re.compile(r"\bflywheel\b.*\bserve\b.*--port (\d+)")


@dataclass
class Block:
    line: int  # of the opening fence
    commands: list[str]

    @property
    def kind(self) -> str:
        if any(LONG.match(c) for c in self.commands):
            return "slow"
        if any(SERVE.search(c) for c in self.commands):
            return "serve"
        if any(c.startswith("curl ") for c in self.commands):
            return "curl"
        return "fast"

    @property
    def id(self) -> str:
        return f"README.md:{self.line}"


def shell_blocks(text: str) -> list[Block]:
    """The README's fenced shell blocks, each as its commands (continuation lines joined)."""
    blocks: list[Block] = []
    current: Block | None = None
    for number, line in enumerate(text.splitlines(), 1):
        fence = re.match(r"^```(\w*)\s*$", line)
        if fence and current is None and fence.group(1) in SHELL_FENCES:
            current = Block(number, [])
        elif line.startswith("```") and current is not None:
            blocks.append(current)
            current = None
        elif current is not None and line.strip() and not line.lstrip().startswith("#"):
            if current.commands and current.commands[-1].endswith("\\"):
                current.commands[-1] = current.commands[-1][:-1] + line.strip()
            else:
                current.commands.append(line.strip())
    return blocks


BLOCKS = shell_blocks((ROOT / "README.md").read_text(encoding="utf-8"))


PYCACHE = Path(os.environ.get("TMPDIR", "/tmp")) / "flywheel-readme-pycache"


def _fresh_shell_env() -> dict[str, str]:
    """A login-like environment: no virtualenv on PATH, no flywheel settings; compiled
    modules cached outside the tree, as a user's interpreter caches them."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("FLYWHEEL_", "VIRTUAL_ENV", "PYTHONDONTWRITEBYTECODE"))
    }
    env["PATH"] = os.pathsep.join(
        p for p in env.get("PATH", "/usr/bin:/bin").split(os.pathsep) if ".venv" not in p
    )
    env["PYTHONPYCACHEPREFIX"] = str(PYCACHE)
    env["COLUMNS"] = "160"
    return env


def _copy_tracked(dest: Path) -> None:
    files = subprocess.run(
        ["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True
    ).stdout.split(b"\0")
    for name in filter(None, files):
        source = ROOT / os.fsdecode(name)
        if source.is_file():
            target = dest / os.fsdecode(name)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target)


def _run(script: str, cwd: Path, env: dict[str, str], timeout: float = 600) -> None:
    done = subprocess.run(
        ["bash", "-e", "-o", "pipefail", "-c", script],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert done.returncode == 0, (
        f"exit {done.returncode}\n--- script\n{script}\n--- stdout\n{done.stdout[-3000:]}"
        f"\n--- stderr\n{done.stderr[-3000:]}"
    )


@pytest.fixture(scope="module")
def clone(tmp_path_factory) -> Path:
    """The tracked files, the project's virtualenv and a short demo (what `make demo` makes)."""
    dest = tmp_path_factory.mktemp("clone")
    _copy_tracked(dest)
    (dest / ".venv").symlink_to(ROOT / ".venv", target_is_directory=True)
    _run(".venv/bin/flywheel demo --cycles 2 --requests 60", dest, _fresh_shell_env())
    return dest


def test_the_readme_has_runnable_blocks_of_every_kind() -> None:
    kinds = [b.kind for b in BLOCKS]
    assert {"slow", "fast", "serve", "curl"} <= set(kinds), kinds
    setup = next(b for b in BLOCKS if b.kind == "slow")
    assert [c.split("#")[0].strip() for c in setup.commands] == ["make demo", "make test"]
    for block in BLOCKS:  # nothing relies on an activated virtualenv
        for command in block.commands:
            assert not re.match(r"^(\w+=\S+ )*flywheel\b", command), (block.id, command)


@pytest.mark.parametrize("block", [b for b in BLOCKS if b.kind == "fast"], ids=lambda b: b.id)
def test_readme_block_runs_as_written(block: Block, clone: Path) -> None:
    _run("\n".join(block.commands), clone, _fresh_shell_env())


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_readme_service_and_curl_examples_run_as_written(clone: Path) -> None:
    [serve] = [b for b in BLOCKS if b.kind == "serve"]
    curls = [b for b in BLOCKS if b.kind == "curl"]
    [written] = {m.group(1) for c in serve.commands if (m := SERVE.search(c))}
    port = str(_free_port())
    log = clone / "serve.log"
    server = subprocess.Popen(
        ["bash", "-c", "\n".join(c.replace(written, port) for c in serve.commands)],
        cwd=clone,
        env=_fresh_shell_env(),
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/health", timeout=2)
                break
            except OSError:
                assert server.poll() is None, log.read_text()
                assert time.monotonic() < deadline, "flywheel serve did not answer in 120 s"
                time.sleep(0.3)
        for block in curls:
            script = "\n".join(c.replace(f":{written}/", f":{port}/") for c in block.commands)
            _run(script, clone, _fresh_shell_env(), timeout=120)
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)


@pytest.mark.slow
@pytest.mark.skipif(
    os.environ.get("FLYWHEEL_README_LONG") != "1",
    reason="installs and runs the whole suite: set FLYWHEEL_README_LONG=1 to run it",
)
def test_readme_long_blocks_run_as_written(tmp_path: Path) -> None:
    """`make demo`, `make test` and the benchmarks, in order, in a clone with no virtualenv."""
    _copy_tracked(tmp_path)
    env = _fresh_shell_env()  # without FLYWHEEL_README_LONG: `make test` does not recurse
    for block in (b for b in BLOCKS if b.kind == "slow"):
        _run("\n".join(block.commands), tmp_path, env, timeout=3600)
