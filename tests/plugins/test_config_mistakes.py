"""Plugin references in flywheel.yaml are checked when the file is loaded: each mistake names
its file, line and key path and the valid choices, and `flywheel cycle`/`run` exit non-zero on
it before doing any work. Dotted-path plugins import from the config file's folder; `flywheel
plugins` reports a broken installed package once and fails only for what the config uses."""

from __future__ import annotations

import json
import textwrap
import uuid
from pathlib import Path

import pytest
from click.testing import CliRunner

from flywheel_middleware.cli import main
from flywheel_middleware.plugin_system.manager import reset_cache

HEAD = """\
workflows:
  qa:
    config: {llm: {temperature: 0.2}}
"""

# (what is wrong, the lines after HEAD, the line it is on, what the message must say)
MISTAKES = [
    (
        "unknown reward type",
        "rewards:\n  - type: explicit_rating\n  - type: explict_rating\n",
        6,
        [
            "rewards[1].type: unknown reward type 'explict_rating'",
            "did you mean 'explicit_rating'?",
            "known reward types: business_event, explicit_rating, implicit, llm_judge, rule",
        ],
    ),
    (
        "unknown filter type",
        "filters: [{type: dedupe}, {type: llm_rubrik}]\n",
        4,
        ["filters[1].type: unknown filter type 'llm_rubrik'", "json_schema, llm_evaluate"],
    ),
    (
        "unknown promoter type",
        "promoters:\n  - type: sequentail\n",
        5,
        ["promoters[0].type: unknown promoter type", "known promoter types: sequential, threshold"],
    ),
    (
        "unknown mutator type",
        "mutators:\n  - {type: param}\n  - {type: prompt_rewriter}\n",
        6,
        ["mutators[1].type: unknown mutator type", "known mutator types: param, prompt_rewrite"],
    ),
    (
        "unknown param",
        "promoters:\n  - type: sequential\n    params: {alfa: 0.1}\n",
        6,
        ["promoters[0].params.alfa: unknown key (valid keys: alpha, ", "min_effect"],
    ),
    (
        "param out of range",
        "rewards:\n  - type: explicit_rating\n    weight: 1\n  - type: rule\n"
        "    params:\n      expression: output != ''\n      when_true: 7\n",
        10,
        ["rewards[1].params.when_true: Input should be less than or equal to 1", "(got 7)"],
    ),
    (
        "unknown judge type in the regression gate",
        "evaluation:\n  runner: 'team_agent:run'\n  judges:\n    - {type: explicit_ratin}\n",
        7,
        ["evaluation.judges[0].type: unknown reward type 'explicit_ratin'", "known reward types"],
    ),
    (
        "plugins: path that does not import",
        "plugins:\n  - no_such_plugin_module_xyz\n",
        5,
        ["plugins[0]: cannot import 'no_such_plugin_module_xyz'"],
    ),
]


def _write(tmp_path: Path, body: str) -> Path:
    path = tmp_path / "flywheel.yaml"
    path.write_text(
        HEAD + body + f"controller: {{report_dir: {tmp_path / 'reports'}}}\n", encoding="utf-8"
    )
    return path


def _flywheel(path: Path, tmp_path: Path, *args: str):
    return CliRunner().invoke(
        main, ["--config", str(path), "--store", f"sqlite:///{tmp_path / 'fw.db'}", *args]
    )


@pytest.mark.parametrize(
    ("body", "line", "expected"),
    [m[1:] for m in MISTAKES],
    ids=[m[0] for m in MISTAKES],
)
def test_cycle_exits_non_zero_naming_the_line_and_the_choices(tmp_path, body, line, expected):
    path = _write(tmp_path, body)
    result = _flywheel(path, tmp_path, "cycle")
    assert result.exit_code == 1, result.output
    assert f"{path}, line {line}: " in result.output
    for text in expected:
        assert text in result.output
    assert "Traceback" not in result.output
    assert not (tmp_path / "reports").exists()  # nothing ran: no report


def test_every_command_refuses_an_unknown_type_and_run_stops(tmp_path):
    path = _write(tmp_path, "rewards: [{type: thumbs}]\n")
    for args in (["stats"], ["run", "--every", "1s", "--cycles", "1"]):
        result = _flywheel(path, tmp_path, *args)
        assert result.exit_code == 1, (args, result.output)
        assert f"{path}, line 4: rewards[0].type: unknown reward type 'thumbs'" in result.output
    assert not (tmp_path / "reports").exists()


def test_cycle_creates_each_plugin_before_running(tmp_path):
    """Mistakes only the plugin itself can see (an unsafe rule, a dotted path in params)."""
    body = (
        "rewards:\n"
        "  - type: rule\n"
        "    params: {expression: \"__import__('os')\"}\n"
        "  - type: rule\n"
        "    params: {callable: 'no_such_module_abc:score'}\n"
    )
    path = _write(tmp_path, body)
    result = _flywheel(path, tmp_path, "cycle")
    assert result.exit_code == 1, result.output
    assert f"{path}, line 6: rewards[0].params: expression" in result.output
    assert f"{path}, line 8: rewards[1].params: cannot import module 'no_such_module_abc'" in (
        result.output
    )


def _plugin_module(folder: Path) -> str:
    """A reward plugin and a rule callable in a module next to flywheel.yaml (unique name)."""
    name = f"team_rewards_{uuid.uuid4().hex[:8]}"
    (folder / f"{name}.py").write_text(
        textwrap.dedent(
            """
            from flywheel_middleware import hookimpl
            from flywheel_middleware.plugin_system.base import RewardSource


            class Politeness(RewardSource):
                type_name = "politeness"

                def score(self, samples):
                    return [1.0 for _ in samples]


            @hookimpl
            def register_reward_sources():
                return [Politeness]


            def says_thanks(sample):
                return 1.0
            """
        ),
        encoding="utf-8",
    )
    return name


def test_dotted_path_plugins_import_from_the_config_folder(tmp_path):
    name = _plugin_module(tmp_path)
    body = (
        f"plugins: [{name}]\n"
        "rewards:\n"
        "  - type: politeness\n"
        f"  - {{type: rule, params: {{callable: '{name}:says_thanks'}}}}\n"
    )
    path = _write(tmp_path, body)
    listed = _flywheel(path, tmp_path, "plugins", "--kind", "reward", "--json")
    assert listed.exit_code == 0, listed.output
    data = json.loads(listed.output)
    assert data["problems"] == []
    [row] = [p for p in data["plugins"] if p["type"] == "politeness"]
    assert row["origin"] == f"dotted path {name}"
    result = _flywheel(path, tmp_path, "cycle", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["report"]


def _broken_package(site: Path) -> None:
    """An installed distribution whose flywheel_middleware entry point fails to import."""
    info = site / "brokenpkg-0.1.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: brokenpkg\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[flywheel_middleware]\nbroken = brokenpkg_mod\n")
    (site / "brokenpkg_mod.py").write_text("raise ImportError('needs libfoo')\n")


@pytest.fixture
def broken_package(tmp_path, monkeypatch):
    site = tmp_path / "site"
    _broken_package(site)
    monkeypatch.syspath_prepend(str(site))
    reset_cache()
    yield
    reset_cache()


def test_plugins_reports_a_broken_package_once_and_fails_only_when_used(tmp_path, broken_package):
    path = _write(tmp_path, "rewards: [{type: explicit_rating}]\n")
    result = _flywheel(path, tmp_path, "plugins")
    assert result.exit_code == 0, result.output
    assert result.output.count("needs libfoo") == 1
    assert "not loaded" in result.output and "brokenpkg" in result.output

    path = _write(tmp_path, "rewards: [{type: libfoo_reward}]\n")
    result = _flywheel(path, tmp_path, "plugins")
    assert result.exit_code == 1, result.output
    assert result.output.count("needs libfoo") == 1
    assert "line 4: rewards[0].type: unknown reward type 'libfoo_reward'" in result.output
    assert "(not loaded, see `flywheel plugins`: brokenpkg_mod)" in result.output
