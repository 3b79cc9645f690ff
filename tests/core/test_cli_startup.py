"""The CLI starts fast: `flywheel --help` and `flywheel plugins` import only what they print.

Each case runs the command in a fresh interpreter and lists ``sys.modules`` afterwards, so a
heavy import added at the top of a cli module (or of anything it imports) fails here.
"""

from __future__ import annotations

import json
import os
import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest

import flywheel_middleware.cli as cli_package

# What neither command needs: the store and its database stack, the loop, the service, the
# learning and LLM libraries.
HEAVY = (
    "sqlalchemy",
    "sqlmodel",
    "alembic",
    "fastapi",
    "uvicorn",
    "numpy",
    "sklearn",
    "jsonschema",
    "langchain",
    "langchain_core",
    "flywheel_middleware.store",
    "flywheel_middleware.loop",
)
# `--help` prints the commands' help texts only: no plugin manager, no plugins.
HEAVY_FOR_HELP = (*HEAVY, "flywheel_middleware.plugin_system", "flywheel_middleware.plugins")

HOW_TO_FIND = (
    "find who imports them with: python -X importtime -c "
    "'from flywheel_middleware.cli import main; main()' ARGS"
)

RUN = """
import json, sys
from flywheel_middleware.cli import main
try:
    code = main.main(args=sys.argv[2:], prog_name="flywheel", standalone_mode=False)
except SystemExit as exc:
    code = exc.code
with open(sys.argv[1], "w") as out:
    json.dump({"code": code, "modules": sorted(sys.modules)}, out)
"""


def run_cli(tmp_path: Path, *args: str) -> tuple[str, int, list[str]]:
    """Run ``flywheel ARGS`` in a new interpreter: its stdout, exit code and loaded modules."""
    report = tmp_path / "modules.json"
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLYWHEEL_")}
    env["COLUMNS"] = "200"
    proc = subprocess.run(
        [sys.executable, "-c", RUN, str(report), *args],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    result = json.loads(report.read_text())
    return proc.stdout, result["code"], result["modules"]


def loaded(modules: list[str], heavy: tuple[str, ...]) -> list[str]:
    """The heavy modules loaded, each named once (its package, not every submodule)."""
    found = [m for m in modules if any(m == h or m.startswith(h + ".") for h in heavy)]
    return [m for m in found if m.rpartition(".")[0] not in found]


def test_help_lists_every_command_without_importing_their_dependencies(tmp_path) -> None:
    out, code, modules = run_cli(tmp_path, "--help")
    assert code == 0
    for name in (
        "analyze",
        "bad-cases",
        "config",
        "cycle",
        "db",
        "demo",
        "experiment",
        "export",
        "implicit",
        "import",
        "init",
        "plugins",
        "promote",
        "rewards",
        "rollback",
        "rollouts",
        "routing",
        "run",
        "serve",
        "show",
        "stats",
    ):
        assert f"\n  {name} " in out, f"{name} missing from --help:\n{out}"
    assert "List plugins: built-ins" in out  # the commands' help texts, not only names
    heavy = loaded(modules, HEAVY_FOR_HELP)
    assert not heavy, f"`flywheel --help` imported {heavy}; {HOW_TO_FIND}"


def test_plugins_loads_the_plugin_manager_but_not_the_store_or_the_loop(tmp_path) -> None:
    config = tmp_path / "flywheel.yaml"
    config.write_text(f"store: {{url: 'sqlite:///{tmp_path / 'fw.db'}'}}\n")
    out, code, modules = run_cli(tmp_path, "plugins", "--config", str(config), "--json")
    assert code in (0, None), out
    listed = json.loads(out)
    assert {p["kind"] for p in listed["plugins"]} >= {"filter", "reward", "mutator", "promoter"}
    assert "flywheel_middleware.plugin_system.manager" in modules
    heavy = loaded(modules, HEAVY)
    assert not heavy, f"`flywheel plugins` imported {heavy}; {HOW_TO_FIND}"
    assert not (tmp_path / "fw.db").exists()  # listing plugins opens no store


@pytest.mark.parametrize(
    "name",
    sorted(
        info.name
        for info in pkgutil.iter_modules(cli_package.__path__)
        if info.name != "common" and not info.name.startswith("_")
    ),
)
def test_every_cli_module_is_registered(name: str) -> None:
    assert name in cli_package.COMMAND_MODULES
