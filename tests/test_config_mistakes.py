"""Config mistakes as users make them, through the command they run: a TOML config given to
``recsys-moe generate`` and a serve config given to ``recsys-moe serve`` each get one line
on stderr naming the file and the key, exit code 2, no traceback and no work done."""

from __future__ import annotations

import re

import pytest

from pipelines import cli
from tests.conftest import REPO

DEFAULT_TOML = (REPO / "configs" / "default.toml").read_text()
SERVE_YAML = (REPO / "serving" / "config.yaml").read_text()


def _set(text: str, key: str, value: str) -> str:
    """``text`` with the first ``key = ...`` line (TOML) set to ``value``."""
    out, n = re.subn(rf"^{key} = .*$", f"{key} = {value}", text, count=1, flags=re.M)
    assert n == 1, key
    return out


def _under(text: str, section: str, line: str) -> str:
    """``line`` added as the first line of TOML table ``[section]``."""
    return text.replace(f"[{section}]\n", f"[{section}]\n{line}\n", 1)


# (what is wrong, the config's text, what the message must name)
TOML_MISTAKES = [
    ("unknown key", _under(DEFAULT_TOML, "training", "epoch = 3"), "training: unknown key(s) ['epoch']"),
    ("unknown section", DEFAULT_TOML + "\n[trainig]\nepochs = 3\n", "unknown key(s) ['trainig']"),
    ("string for an integer", _set(DEFAULT_TOML, "epochs", '"three"'), "training.epochs: expected an integer"),
    ("float for an integer", _set(DEFAULT_TOML, "epochs", "2.5"), "training.epochs: expected an integer"),
    ("string for a number", _set(DEFAULT_TOML, "lr", '"fast"'), "training.lr: expected a number"),
    ("string for a bool", _under(DEFAULT_TOML, "training", 'expert_parallel = "yes"'), "training.expert_parallel: expected true/false"),
    ("number for a list", _set(DEFAULT_TOML, "expert_hidden", "64"), "model.expert_hidden: expected a list"),
    ("string in an int list", _set(DEFAULT_TOML, "expert_hidden", '["wide"]'), "model.expert_hidden[0]: expected an integer"),
    ("unknown architecture", _set(DEFAULT_TOML, "arch", '"moe"'), "model.arch: 'moe' is not allowed"),
    ("unknown routing", _set(DEFAULT_TOML, "routing", '"random"'), "model.routing: 'random' is not allowed"),
    ("zero experts", _set(DEFAULT_TOML, "n_experts", "0"), "[model] n_experts: must be >= 1"),
    ("top-k over the experts", _under(_set(_set(DEFAULT_TOML, "n_experts", "1"), "routing", '"topk"'), "model", "top_k = 2"), "[model] top_k: cannot exceed n_experts"),
    ("bad cross", _set(DEFAULT_TOML, "interactions", '["user_id**item_id"]'), "interactions"),
    ("test split too large", _under(DEFAULT_TOML, "features", "test_fraction = 0.7"), "[features] test_fraction: must be in [0, 0.5)"),
    ("segment bounds reversed", _set(_set(DEFAULT_TOML, "casual_min", "50"), "power_min", "5"), "casual_min/power_min"),
    ("zero learning rate", _set(DEFAULT_TOML, "lr", "0.0"), "[training] lr/embedding_lr: must be > 0"),
    ("negative patience", _set(DEFAULT_TOML, "early_stopping_patience", "-1"), "[training] early_stopping_patience: must be >= 0"),
    ("unknown data source", _set(DEFAULT_TOML, "kind", '"kaggle"'), "'kaggle' is not allowed"),
    ("funnel parent not a task", DEFAULT_TOML.replace('funnel_parent = "click"', 'funnel_parent = "clik"'), "funnel_parent='clik' is not a task"),
    ("weight decay on fused tables", _under(DEFAULT_TOML, "training", "embedding_weight_decay = 0.001"), "embedding_weight_decay"),
    ("not TOML", DEFAULT_TOML + "\n[model\n", "not valid TOML"),
]  # fmt: skip


def _yaml_set(key: str, value: str) -> str:
    out, n = re.subn(rf"^(\s*){key}: .*$", rf"\g<1>{key}: {value}", SERVE_YAML, count=1, flags=re.M)
    assert n == 1, key
    return out


SERVE_MISTAKES = [
    ("unknown setting", _yaml_set("max_candidates", "1000\n      max_candidate: 5"), "unknown key(s) ['max_candidate']"),
    ("string for a number", _yaml_set("poll_s", "soon"), "args.poll_s: expected a number"),
    ("candidates out of range", _yaml_set("max_candidates", "0"), "max_candidates: must be in 1..10000"),
    ("unknown segment key", SERVE_YAML.replace("placement: inline\n          task_weights: {click: 1.0, like: 1.0, conversion: 2.0}", "placement: inline\n          replica: 2", 1), "unknown key(s) ['replica']"),
    ("string for an integer", _yaml_set("offload_capacity", "some"), "offload_capacity: expected an integer"),
    ("unknown placement", SERVE_YAML.replace("placement: inline", "placement: sidecar", 1), "placement: 'sidecar' is not allowed"),
    ("inline segment with replicas", SERVE_YAML.replace("placement: inline", "placement: inline\n          replicas: 2", 1), "segments.cold.replicas"),
    ("default segment not declared", _yaml_set("default_segment", "power"), "default_segment: 'power' is not in"),
    ("unknown user segment", SERVE_YAML.replace("user_segments: [cold]", "user_segments: [newbies]"), "segments.cold.user_segments"),
    ("string task weight", SERVE_YAML.replace("{click: 1.0, like: 0.5, conversion: 1.0}", "{click: high}"), "task_weights.click: expected a number"),
    ("bad port", _yaml_set("port", "http"), "http_options.port: expected a port number"),
    ("no applications", "http_options:\n  port: 8000\n", "applications: expected one application"),
    ("not YAML", SERVE_YAML + "\n  - [unclosed\n", "not valid YAML"),
]  # fmt: skip


def _run(capsys, argv: list[str]) -> str:
    code = cli.main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    return err


@pytest.mark.parametrize(
    "text,names", [m[1:] for m in TOML_MISTAKES], ids=[m[0] for m in TOML_MISTAKES]
)
def test_toml_mistake_is_one_line_naming_file_and_key(tmp_path, capsys, text, names):
    p = tmp_path / "mine.toml"
    # every path the config names under tmp_path: a mistake missed would write there
    p.write_text(text.replace('"data/', f'"{tmp_path}/data/'))
    err = _run(capsys, ["generate", "--config", str(p)])
    assert str(p) in err and names in err, err
    assert not any(tmp_path.glob("data*")) and list(tmp_path.iterdir()) == [p]


@pytest.mark.parametrize(
    "text,names", [m[1:] for m in SERVE_MISTAKES], ids=[m[0] for m in SERVE_MISTAKES]
)
def test_serve_config_mistake_is_one_line_naming_file_and_key(tmp_path, capsys, text, names):
    p = tmp_path / "serve.yaml"
    p.write_text(text)
    err = _run(capsys, ["serve", "--serve-config", str(p)])
    assert str(p) in err and names in err, err


def test_missing_config_files(tmp_path, capsys):
    err = _run(capsys, ["generate", "--config", str(tmp_path / "nope.toml")])
    assert "nope.toml: config file not found" in err
    err = _run(capsys, ["serve", "--serve-config", str(tmp_path / "nope.yaml")])
    assert "nope.yaml: no such serve config" in err


def test_the_shipped_serve_config_is_valid():
    from serving.run import read_serve_config

    assert read_serve_config(REPO / "serving" / "config.yaml")["applications"][0]["args"]
