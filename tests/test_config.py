from __future__ import annotations

from pathlib import Path

import pytest

from recsys_moe.config import Config, ConfigError, config_from_dict, load_config

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("path", sorted((REPO / "configs").glob("*.toml")), ids=lambda p: p.name)
def test_shipped_configs_load(path):
    cfg = load_config(path)
    assert isinstance(cfg, Config)
    assert cfg.data.tasks and cfg.name == path.stem


def write(tmp_path, text: str) -> Path:
    p = tmp_path / "c.toml"
    p.write_text(text)
    return p


def test_unknown_key_names_key_file_and_allowed(tmp_path):
    p = write(tmp_path, "[features]\npartitons = 4\n")
    with pytest.raises(ConfigError) as e:
        load_config(p)
    msg = str(e.value)
    assert str(p) in msg and "partitons" in msg and "partitions" in msg


def test_unknown_section(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown key\(s\) \['trainng'\]"):
        load_config(write(tmp_path, "[trainng]\nepochs = 1\n"))


def test_bad_literal_lists_allowed_values(tmp_path):
    with pytest.raises(ConfigError) as e:
        load_config(write(tmp_path, '[model]\narch = "moe"\n'))
    assert "model.arch" in str(e.value) and "'mmoe'" in str(e.value) and "'ple'" in str(e.value)


def test_wrong_type(tmp_path):
    with pytest.raises(ConfigError, match=r"features.partitions: expected an integer"):
        load_config(write(tmp_path, '[features]\npartitions = "four"\n'))
    with pytest.raises(ConfigError, match=r"data.user_categorical: expected a list"):
        load_config(write(tmp_path, '[data]\nuser_categorical = "age"\n'))


def test_value_validation(tmp_path):
    with pytest.raises(ConfigError, match=r"valid_fraction: must be in \(0, 0.5\)"):
        load_config(write(tmp_path, "[features]\nvalid_fraction = 0.7\n"))
    with pytest.raises(ConfigError, match=r"test_fraction: must be in \[0, 0.5\)"):
        load_config(write(tmp_path, "[features]\ntest_fraction = -0.1\n"))
    assert (
        load_config(write(tmp_path, "[features]\ntest_fraction = 0\n")).features.test_fraction == 0
    )
    with pytest.raises(ConfigError, match="top_k"):
        load_config(write(tmp_path, "[model]\ntop_k = 3\n"))
    with pytest.raises(
        ConfigError, match='embedding_weight_decay: needs embedding_optimizer = "adam"'
    ):
        load_config(write(tmp_path, "[training]\nembedding_weight_decay = 1e-5\n"))
    adam = "[training]\nembedding_optimizer = 'adam'\nembedding_weight_decay = 1e-5\n"
    assert load_config(write(tmp_path, adam)).training.embedding_weight_decay == 1e-5


def test_task_validation():
    base = {"data": {"tasks": [{"name": "click"}, {"name": "buy", "funnel_parent": "clik"}]}}
    with pytest.raises(ConfigError, match="funnel_parent='clik' is not a task"):
        config_from_dict(base)
    with pytest.raises(ConfigError, match="distinct"):
        config_from_dict({"data": {"tasks": [{"name": "a"}, {"name": "a"}]}})
    with pytest.raises(ConfigError, match="kind"):
        config_from_dict({"data": {"tasks": [{"name": "a", "kind": "multiclass"}]}})


def test_column_listed_twice():
    with pytest.raises(ConfigError, match="also listed in user_categorical"):
        config_from_dict({"data": {"user_categorical": ["age"], "item_categorical": ["age"]}})
    with pytest.raises(ConfigError, match="multi_valued"):
        config_from_dict({"data": {"multi_valued": ["tags"]}})


def test_missing_and_unparsable_file(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.toml")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(write(tmp_path, "[data\n"))


def test_overrides_and_frozen(tmp_path):
    cfg = load_config(REPO / "configs" / "default.toml", {"synthetic.n_rows": 123})
    assert cfg.synthetic.n_rows == 123
    with pytest.raises(AttributeError):
        cfg.synthetic.n_rows = 5  # type: ignore[misc]


def test_interaction_syntax():
    ok = config_from_dict({"model": {"interactions": ["user_id+age*item_id", "a*b"]}})
    assert ok.model.interactions == ["user_id+age*item_id", "a*b"]
    for bad in ("user_id", "a**b", "a+*b", "a*b*c"):
        with pytest.raises(ConfigError, match="write a cross"):
            config_from_dict({"model": {"interactions": [bad]}})
