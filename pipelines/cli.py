"""The ``recsys-moe`` command: one subcommand per stage, each also ``python -m pipelines.<stage>``."""

from __future__ import annotations

import argparse
import importlib
import signal
import sys
from typing import Any

import recsys_moe.cluster  # noqa: F401  (first: Ray's settings are read when ray is imported)
from recsys_moe import console
from recsys_moe.config import ConfigError
from recsys_moe.data.schema import RawLogError

COMMANDS = {
    "generate": (
        "pipelines.generate",
        "materialise the raw log (synthetic generator or a dataset loader)",
    ),
    "features": (
        "pipelines.build_features",
        "build the feature store from the raw log (Ray Data + Polars)",
    ),
    "train": (
        "pipelines.train",
        "distributed training (Ray Train + torchrec), evaluation, MLflow run and registry",
    ),
    "candidates": (
        "pipelines.candidates",
        "write a candidate file to score from the store's users and items",
    ),
    "score": (
        "pipelines.batch_score",
        "batch scoring of candidate rows on Ray Data with a registered model",
    ),
    "extend": (
        "pipelines.extend",
        "add a new domain (experts + gates) to a registered model, the rest frozen",
    ),
    "serve": (
        "serving.run",
        "the segment-routed ranking service on Ray Serve (127.0.0.1:8000)",
    ),
    "online-report": (
        "serving.live:main_report",
        "online AUC per version x segment x task from the service's feedback log (an MLflow run)",
    ),
    "promote": (
        "serving.live:main_promote",
        "--from-live: move a segment's champion alias to its challenger on live evidence",
    ),
    "ui": (
        "pipelines.ui",
        "the MLflow experiment UI over the tracking store (127.0.0.1:5000)",
    ),
}


MODEL_HELP = (
    "models:/<name>@<alias> (default: the config's registered model at its alias, "
    "models:/recsys_moe_<config name>@champion), models:/<name>/<version> or a bundle folder"
)


def command_parser(name: str, doc: str | None, *, model: bool = False) -> argparse.ArgumentParser:
    """The parser of ``recsys-moe <name>``: ``--config`` and ``--no-progress`` (and, with
    ``model``, ``--model``), as every stage takes them."""
    ap = argparse.ArgumentParser(prog=f"recsys-moe {name}", description=(doc or "").splitlines()[0])
    ap.add_argument("--config", default="configs/default.toml", help="the TOML config")
    ap.add_argument("--no-progress", action="store_true", help="no progress bars or lines")
    if model:
        ap.add_argument("--model", default=None, help=MODEL_HELP)
    return ap


def parse_model_command(
    ap: argparse.ArgumentParser, argv: list[str] | None
) -> tuple[Any, Any, str]:
    """A model command's arguments, the config they name, and the model it works on:
    ``--model``, or the config's registered model at its alias."""
    from recsys_moe.config import load_config

    args = ap.parse_args(argv)
    cfg = load_config(args.config)
    return args, cfg, args.model or cfg.model_uri


def config_from_args(
    ap: argparse.ArgumentParser, argv: list[str] | None, flags: dict[str, str]
) -> tuple[argparse.Namespace, Any]:
    """A command's arguments (``ap`` plus ``--set SECTION.KEY=VALUE``) and the config they
    make: ``--config`` with the ``--set`` overrides, then each of ``flags`` (argument ->
    config key) the user gave (not None, not False) on top."""
    from recsys_moe.config import load_config

    ap.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
    args = ap.parse_args(argv)
    overrides = parse_sets(args.set)
    for name, key in flags.items():
        value = getattr(args, name)
        if value is not None and value is not False:
            overrides[key] = value
    return args, load_config(args.config, overrides)


def parse_sets(items: list[str]) -> dict[str, Any]:
    """``--set SECTION.KEY=VALUE`` overrides: JSON values (numbers, true / false, lists),
    anything else a plain string."""
    import json

    overrides: dict[str, Any] = {}
    for item in items:
        key, _, value = item.partition("=")
        try:
            overrides[key] = json.loads(value)
        except json.JSONDecodeError:
            overrides[key] = value
    return overrides


def usage() -> str:
    lines = [
        "usage: recsys-moe <command> [--config configs/default.toml] [-v] [options]",
        "",
        "Each command shows its own progress and summary; library logs and known-harmless",
        "warnings go to logs/<command>-<time>.log (RECSYS_MOE_LOG_DIR), named at the end.",
        "-v / --verbose shows everything on the terminal instead.",
        "",
        "commands:",
    ]
    lines += [f"  {name:<10} {help_}" for name, (_, help_) in COMMANDS.items()]
    lines += ["", "recsys-moe <command> --help shows a command's options."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0
    name, rest = argv[0], [a for a in argv[1:] if a not in ("-v", "--verbose")]
    verbose = len(rest) < len(argv) - 1
    if name not in COMMANDS:
        print(f"recsys-moe: unknown command {name!r}\n\n{usage()}", file=sys.stderr)
        return 2
    where, _, entry = COMMANDS[name][0].partition(":")
    module = importlib.import_module(where)
    run = getattr(module, entry or "main")
    # SIGTERM (a scheduler, `kill`, a container stop) unwinds like Ctrl-C: a job's
    # half-written folder is removed, its MLflow run ends KILLED, the service shuts down
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        with console.session(name, verbose) as log:
            ray_before = _ray_up()
            try:
                code = int(run(rest) or 0)
            finally:
                if _ray_up() and not ray_before:  # the Ray this command started, stopped
                    sys.modules["ray"].shutdown()  # here: its last lines reach the log
        if log is not None:
            print(f"library logs: {log} (-v shows them here)")
        return code
    except (ConfigError, RawLogError) as e:
        print(f"recsys-moe {name}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"recsys-moe {name}: stopped before it finished; rerun the same command "
              "(docs/operations.md, 'When a job is killed')", file=sys.stderr)  # fmt: skip
        return 130


def _ray_up() -> bool:
    ray = sys.modules.get("ray")
    return ray is not None and ray.is_initialized()


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


if __name__ == "__main__":
    sys.exit(main())
