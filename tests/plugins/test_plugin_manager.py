"""Plugin discovery (built-ins, entry points after a real install, dotted paths) and errors."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from click.testing import CliRunner

from flywheel_middleware.config import parse_config
from flywheel_middleware.errors import ConfigError, PluginError
from flywheel_middleware.plugin_system.manager import FlywheelPluginManager, plugin_manager

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "flywheel-plugin-example"


def test_builtins_are_found_with_their_origin() -> None:
    manager = plugin_manager(parse_config(""))
    filters = manager.types("filter")
    assert {"llm_rubric", "json_schema", "dedupe"} <= set(filters)
    assert filters["dedupe"].origin == "built-in"
    assert {"explicit_rating", "rule", "business_event", "llm_judge"} <= set(
        manager.types("reward")
    )
    assert "regex" in manager.types("redactor")
    assert manager.errors == []


def test_unknown_type_lists_the_known_ones() -> None:
    cfg = parse_config("filters:\n  - type: llm_rubrik\n", source="team.yaml")
    with pytest.raises(PluginError) as err:
        plugin_manager(cfg).build_all("filter", cfg)
    message = str(err.value)
    assert "team.yaml, line 2: filters[0].type: unknown filter type 'llm_rubrik'" in message
    assert "(did you mean 'llm_rubric'?)" in message
    assert "known filter types: dedupe, json_schema, llm_evaluate, llm_rubric" in message


def test_bad_params_name_the_key_path() -> None:
    cfg = parse_config(
        "filters:\n  - type: dedupe\n  - type: llm_rubric\n"
        "    params: {temperature: 7, max_concurrency: 0, colour: red}\n",
        source="team.yaml",
    )
    with pytest.raises(ConfigError) as err:
        plugin_manager(cfg).build_all("filter", cfg)
    message = str(err.value)
    assert (
        "team.yaml, line 4: filters[1].params.temperature: Input should be less than or equal to 2"
        in message
    )
    assert "(got 7)" in message
    assert "team.yaml, line 4: filters[1].params.max_concurrency:" in message
    assert "team.yaml, line 4: filters[1].params.colour: unknown key (valid keys: " in message
    assert "custom_rubrics" in message


def test_bad_yaml_names_file_line_and_choices() -> None:
    with pytest.raises(ConfigError, match="team.yaml: not valid YAML"):
        parse_config("filters:\n  - type: dedupe\n   params: {}\n", source="team.yaml")
    with pytest.raises(ConfigError) as err:
        parse_config("filters:\n  - type: dedupe\n    paramz: {}\n", source="team.yaml")
    assert "team.yaml, line 3: unknown key 'filters[0].paramz'" in str(err.value)
    assert "valid keys here: enabled, name, params, type, weight" in str(err.value)


def test_dotted_paths_and_contained_hook_failures() -> None:
    cfg = parse_config("plugins: ['tests.plugins.bad_hooks']\nrewards: [{type: constant_half}]\n")
    manager = plugin_manager(cfg, fresh=True)
    rewards = manager.types("reward")
    assert rewards["constant_half"].origin == "dotted path tests.plugins.bad_hooks"
    assert "dedupe" in manager.types("filter")  # the raising hook does not hide the others
    errors = [str(e) for e in manager.errors]
    assert any("tests.plugins.bad_hooks" in e and "cannot list my filters" in e for e in errors)
    assert any("is not a subclass of RewardSource" in e for e in errors)
    assert any("unknown hook" in e and "register_filter" in e for e in errors)
    [src] = manager.build_all("reward", cfg)
    assert src.name == "constant_half"
    with pytest.raises(ConfigError, match=r"plugins\[0\]: cannot import 'no_such_pkg.mod'"):
        plugin_manager(parse_config("plugins: [no_such_pkg.mod]\n"), fresh=True)


def test_redactor_from_yaml_redacts_before_storing(sqlite_url) -> None:
    import flywheel_middleware as fw
    from flywheel_middleware.store import queries

    fw.configure(config={"store": {"url": sqlite_url}, "redactors": [{"type": "regex"}]})
    try:
        with fw.rollout("qa", input="mail me at ann@example.com") as r:
            with fw.span("tool", kind="tool") as s:
                s.set_output({"token": "sk-abcdefghijklmnopqrstuvwx"})
            r.set_output("done")
        fw.flush()
        store = fw.get_store()
        row = queries.find_rollout(store, r.id)
        assert row.input == "mail me at [REDACTED:email]"
        [span] = queries.spans_of(store, r.id)
        assert span.output == {"token": "[REDACTED:api_key]"}
    finally:
        fw.shutdown()


@pytest.mark.slow
def test_third_party_plugin_found_after_pip_install(tmp_path) -> None:
    """Really install the example package (into a throwaway target dir) and use it."""
    target = tmp_path / "site"
    uv = Path(sys.executable).with_name("uv")
    uv_path = str(uv) if uv.exists() else shutil.which("uv")
    # uv is fast (its cache holds the build backend); plain pip works too, just slower
    cmd = (
        [uv_path, "pip", "install", "--python", sys.executable]
        if uv_path
        else [sys.executable, "-m", "pip", "install", "-q"]
    ) + ["--no-deps", "--target", str(target), str(EXAMPLE)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr
    assert (target / "flywheel_plugin_example-0.1.0.dist-info" / "entry_points.txt").exists()
    script = textwrap.dedent(
        f"""
        import json
        import flywheel_middleware as fw
        from flywheel_middleware.store import queries
        from flywheel_middleware.config import parse_config
        from flywheel_middleware.loop.datasets import load_samples
        from flywheel_middleware.plugin_system.manager import plugin_manager
        from flywheel_middleware.loop.rewards import compute_rewards

        cfg = parse_config('''
        store: {{url: "sqlite:///{tmp_path / "fw.db"}"}}
        filters: [{{type: min_length, params: {{min_chars: 12}}}}]
        rewards: [{{type: keyword, params: {{keywords: [refund]}}}}]
        ''')
        manager = plugin_manager(cfg)
        info = manager.types("filter")["min_length"]
        fw.configure(config=cfg)
        with fw.rollout("qa", input="call me on +49 170 1234567") as r:
            r.set_output("your refund is on its way")
        with fw.rollout("qa", input="hi") as r2:
            r2.set_output("no")
        fw.flush()
        store = fw.get_store()
        [flt] = manager.build_all("filter", cfg)
        verdicts = flt.filter(load_samples(store, [r.id, r2.id]))
        rewards = compute_rewards(store, cfg)
        print(json.dumps({{
            "origin": info.origin,
            "reward_origin": manager.types("reward")["keyword"].origin,
            "keep": [v.keep for v in verdicts],
            "rewards": [rewards[r.id].value, rewards[r2.id].value],
            "stored_input": queries.find_rollout(store, r.id).input,
            "errors": [str(e) for e in manager.errors],
        }}))
        fw.shutdown()
        """
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(target), str(ROOT)])}
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120
    )
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["origin"] == "entry point example (flywheel-plugin-example 0.1.0)"
    assert result["reward_origin"] == result["origin"]
    assert result["keep"] == [True, False]
    assert result["rewards"] == [1.0, 0.0]
    assert result["stored_input"] == "call me on [phone]"  # its redact_span hook ran
    assert result["errors"] == []
    # the CLI lists it too, with where it came from
    listing = subprocess.run(
        [
            sys.executable,
            "-c",
            "from flywheel_middleware.cli import main; main()",
            "plugins",
            "--json",
            "--store",
            f"sqlite:///{tmp_path / 'fw.db'}",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        cwd=tmp_path,
    )
    assert listing.returncode == 0, listing.stderr
    rows = json.loads(listing.stdout)["plugins"]
    assert {"kind": "filter", "type": "min_length", "origin": result["origin"]}.items() <= next(
        r for r in rows if r["type"] == "min_length"
    ).items()
    # and it is gone from an interpreter that does not have it installed
    assert "min_length" not in FlywheelPluginManager().types("filter")


def test_cli_plugins_reports_bad_specs(tmp_path) -> None:
    from flywheel_middleware.cli import main

    (tmp_path / "flywheel.yaml").write_text("rewards:\n  - type: nope\n")
    runner = CliRunner()
    result = runner.invoke(
        main,
        [
            "plugins",
            "--config",
            str(tmp_path / "flywheel.yaml"),
            "--store",
            f"sqlite:///{tmp_path / 'db.sqlite'}",
        ],
    )
    assert result.exit_code == 1
    assert "llm_rubric" in result.output
    assert "unknown reward type 'nope'" in result.output


def test_dotted_path_to_an_object() -> None:
    for path in ("tests.plugins.bad_hooks.HOOKS", "tests.plugins.bad_hooks:HOOKS"):
        manager = plugin_manager(parse_config(f"plugins: ['{path}']\n"), fresh=True)
        assert manager.types("reward")["halves"].origin == f"dotted path {path}"
    with pytest.raises(ConfigError, match="has no attribute 'NOPE'"):
        plugin_manager(parse_config("plugins: ['tests.plugins.bad_hooks:NOPE']\n"), fresh=True)


def test_check_config_reports_every_problem() -> None:
    from flywheel_middleware.plugin_system.manager import check_config

    cfg = parse_config(
        "filters: [{type: dedupe}, {type: nope}]\n"
        "rewards: [{type: rule, params: {expression: 'import os'}}]\n",
        source="team.yaml",
    )
    problems = check_config(cfg)
    assert len(problems) == 2
    assert problems[0].startswith("team.yaml, line 1: filters[1].type: unknown filter type 'nope'")
    assert problems[1].startswith(
        "team.yaml, line 2: rewards[0].params: expression 'import os' is not"
    )
    assert check_config(parse_config("filters: [{type: dedupe}]\n")) == []
