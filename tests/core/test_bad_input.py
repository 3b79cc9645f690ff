"""Bad input gets a clear error that names the problem, and changes nothing already stored."""

from __future__ import annotations

import pytest

import flywheel_middleware as fw_module
from flywheel_middleware.config import load_config, parse_config
from flywheel_middleware.errors import (
    ConfigError,
    InvalidFeedbackError,
    StoreError,
    UnknownRolloutError,
)
from flywheel_middleware.store import queries
from flywheel_middleware.store.database import Store

YAML_WITH_TYPO = """\
store:
  url: sqlite:///x.db
workflows:
  qa:
    config: {llm: {temperature: 0.2}}
    tunabel:
      llm.temperature: {min: 0, max: 1}
"""


def test_unknown_yaml_key_names_the_key_the_line_and_the_choices(tmp_path):
    path = tmp_path / "flywheel.yaml"
    path.write_text(YAML_WITH_TYPO)
    with pytest.raises(ConfigError) as err:
        load_config(path)
    message = str(err.value)
    assert "workflows.qa.tunabel" in message
    assert f"{path}, line 6" in message
    assert "tunable" in message  # the valid keys are listed


def test_unknown_top_level_key_and_wrong_type():
    with pytest.raises(ConfigError, match=r"line 1: unknown key 'stroe'.*valid keys here: .*store"):
        parse_config("stroe: {url: x}\n", source="f.yaml")
    with pytest.raises(ConfigError, match=r"line 2: triggers.low_rating.window: .*integer.*'many'"):
        parse_config("triggers:\n  low_rating: {window: many}\n", source="f.yaml")
    with pytest.raises(ConfigError, match="not valid YAML"):
        parse_config("store: [unclosed\n")
    with pytest.raises(ConfigError, match="key 'store' appears twice"):
        parse_config("store: {}\nstore: {}\n")
    with pytest.raises(ConfigError, match="rag.top_k.*either min/max/step or choices"):
        parse_config(
            "workflows:\n  qa:\n    tunable:\n      rag.top_k: {min: 1, max: 3, choices: [1]}\n"
        )


def test_env_interpolation(monkeypatch):
    monkeypatch.setenv("FW_TEST_URL", "sqlite:///from-env.db")
    assert parse_config("store: {url: '${FW_TEST_URL}'}").store.url == "sqlite:///from-env.db"
    assert parse_config("store: {url: '${FW_NOPE:-sqlite:///d.db}'}").store.url == "sqlite:///d.db"
    with pytest.raises(ConfigError, match="FW_MISSING is not set"):
        parse_config("store: {url: '${FW_MISSING}'}")


def test_missing_config_file_named(tmp_path):
    with pytest.raises(ConfigError, match="nope.yaml' does not exist"):
        load_config(tmp_path / "nope.yaml")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"rating": 7}, "rating must be between 1 and 5, got 7"),
        ({"rating": 0}, "between 1 and 5, got 0"),
        ({"rating": "5"}, "rating must be a number"),
        ({"rating": True}, "rating must be a number"),
        ({"thumbs": "sideways"}, "thumbs must be 'up' or 'down'"),
        ({"key": "resolved", "value": "yes"}, "must be a finite number"),
        ({"key": "resolved", "value": float("nan")}, "must be a finite number"),
        ({"rating": 3, "source": "gossip"}, "source 'gossip' is not one of"),
        ({"rating": 3, "thumbs": "up"}, "not rating and thumbs"),
        ({}, "needs rating=, thumbs=, key= or comment="),
    ],
)
def test_bad_feedback_is_rejected_and_nothing_is_stored(fw, kwargs, message):
    with fw.rollout("qa") as r:
        pass
    fw.feedback(r.id, rating=4)
    with pytest.raises(InvalidFeedbackError, match=message):
        fw.feedback(r.id, **kwargs)
    fw.flush()
    assert [(f.key, f.value) for f in queries.feedback_of(fw.get_store(), r.id)] == [
        ("rating", 4.0)
    ]


def test_feedback_for_an_unknown_rollout(fw):
    with fw.rollout("qa") as r:
        pass
    fw.flush()
    with pytest.raises(UnknownRolloutError, match="no rollout with id 'ffff'"):
        fw.feedback("ffff", rating=5)
    fw.flush()
    assert fw.get_store().execute("SELECT COUNT(*) AS n FROM feedback")[0].n == 0
    fw.feedback(r.id, rating=5)  # a known one (already written) still works
    fw.feedback(r, thumbs="up")  # the handle itself is accepted too
    fw.flush()
    assert len(queries.feedback_of(fw.get_store(), r.id)) == 2


def test_feedback_for_a_rollout_not_yet_written_is_accepted(fw):
    with fw.rollout("qa") as r:
        fw.feedback(r.id, rating=2)  # still open: known to this process
    fw.flush()
    assert queries.feedback_of(fw.get_store(), r.id)[0].value == 2.0


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("sqlite:////no/such/folder/x.db", "folder '/no/such/folder' does not exist"),
        ("mysql://localhost/x", "unsupported store URL"),
        ("not a url", "cannot parse store URL"),
        ("postgresql+psycopg://postgres@127.0.0.1:1/test", "cannot open store"),
    ],
)
def test_a_store_url_that_cannot_be_opened(url, message):
    with pytest.raises(StoreError, match=message):
        Store(url)


def test_configure_with_a_bad_store_keeps_the_previous_one(sqlite_url):
    fw_module.configure(store_url=sqlite_url)
    try:
        with fw_module.rollout("qa") as r:
            pass
        with pytest.raises(StoreError):
            fw_module.configure(store_url="sqlite:////no/such/folder/x.db")
        fw_module.flush()
        assert queries.find_rollout(fw_module.get_store(), r.id) is not None
        assert fw_module.get_store().url == sqlite_url
    finally:
        fw_module.shutdown()
