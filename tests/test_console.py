"""recsys_moe/console.py: what a command shows, what goes to its log file only."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from recsys_moe.console import shown

REPO = Path(__file__).resolve().parent.parent

RAY = "\x1b[36m(RayTrainWorker pid=5572)\x1b[0m "


@pytest.mark.parametrize(
    ("line", "stream", "expected"),
    [
        # the command's own lines, from the driver or relayed by Ray from a worker
        ("[features] users: 3,000 rows", "stderr", True),
        (RAY + "[train] epoch 0: train loss 0.8979, valid auc_mean 0.7378", "stdout", True),
        ("recsys-moe score: error: no model at models:/x@champion", "stderr", True),
        ("task        domain       AUC  oracle", "stdout", True),  # the driver's table
        # library chatter, driver or worker, either stream
        ("2026-12-06 20:48:03,562\tINFO logging_progress.py:231 -- ListFiles: 0/1", "stderr", False),
        (RAY + "Successfully loaded: 'fbgemm_gpu_config.so'", "stdout", False),
        (RAY + "Checkpoint successfully created at: Checkpoint(filesystem=local)", "stdout", False),
        ("Successfully registered model 'recsys_moe_default'.", "stderr", False),
        # known-harmless warnings, however they are spelled
        ("/x/mlflow/types/utils.py:440: UserWarning: Hint: Inferred schema contains integer "
         "column(s).", "stderr", False),
        (RAY + "[rank0]:W1206 20:49:13.119000 5572 torch/fx/_symbolic_trace.py:56] "
         "is_fx_tracing will return true for both", "stderr", False),
        ("  color_warning(", "stderr", False),  # a hidden warning's source line
        ("(raylet) WARNING: 8 PYTHON worker processes have been started on node: 2af6",
         "stderr", False),
        # anything else that warns or fails reaches the user
        ("/x/lib.py:3: UserWarning: the table has no rows", "stderr", True),
        (RAY + "sqlite3.OperationalError: database is locked", "stdout", True),
        ("2026/12/06 20:53:03 WARNING mlflow.store: retrying", "stderr", True),
        ("E1206 20:49:13.119 5572 core_worker.cc:12] lost the GCS", "stderr", True),
        ("Traceback (most recent call last):", "stderr", True),
    ],
)  # fmt: skip
def test_what_reaches_the_terminal(line, stream, expected):
    assert shown(line, stream) is expected


def test_an_indented_line_continues_the_line_before_it():
    assert shown('  File "x.py", line 3, in <module>', "stderr", after_shown=True)
    assert not shown('  File "x.py", line 3, in <module>', "stderr", after_shown=False)


SCRIPT = textwrap.dedent(
    """
    import logging, os, sys, warnings
    from recsys_moe import console

    lib = logging.getLogger("somelib")
    lib.addHandler(logging.StreamHandler(sys.stderr))  # bound before the session, like Ray's
    lib.setLevel(logging.INFO)
    with console.session("demo", verbose="-v" in sys.argv) as log:
        print("[demo] step 1 of 2")
        print("result table row")
        lib.info("library info line")
        os.write(2, b"C-level library line\\n")
        warnings.warn("Hint: Inferred schema contains integer column(s).", UserWarning)
        warnings.warn("the input has no rows", UserWarning)
        print("partial line without newline", end="", file=sys.stderr)
    print(f"LOG={log}")
    """
)


def _demo(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "RECSYS_MOE_LOG_DIR": str(tmp_path)}
    return subprocess.run([sys.executable, "-c", SCRIPT, *args], env=env, capture_output=True,
                          text=True, timeout=120)  # fmt: skip


def test_a_session_shows_its_own_lines_and_logs_everything(tmp_path):
    r = _demo(tmp_path)
    assert r.returncode == 0, r.stderr
    out, err = r.stdout, r.stderr
    assert "[demo] step 1 of 2" in out and "result table row" in out
    assert "the input has no rows" in err  # a warning not known to be harmless
    for hidden in ("library info line", "C-level library line", "Inferred schema",
                   "partial line without newline"):  # fmt: skip
        assert hidden not in out + err
    (log,) = tmp_path.glob("demo-*.log")
    assert f"LOG={log}" in out
    text = log.read_text()
    for line in ("[demo] step 1 of 2", "result table row", "library info line",
                 "C-level library line", "Inferred schema", "the input has no rows",
                 "partial line without newline"):  # fmt: skip
        assert line in text, line


def test_verbose_captures_nothing(tmp_path):
    r = _demo(tmp_path, "-v")
    assert r.returncode == 0, r.stderr
    assert "library info line" in r.stderr and "C-level library line" in r.stderr
    assert "Inferred schema" in r.stderr and "LOG=None" in r.stdout
    assert not list(tmp_path.glob("demo-*.log"))


def test_a_traceback_is_shown_whole_unless_it_is_a_known_harmless_one():
    import io

    from recsys_moe.console import _Filtered

    term, log = io.StringIO(), io.StringIO()
    err = _Filtered("stderr", term, log, 2)
    harmless = [
        "Exception in thread PlacementGroupCleanerMonitor:",
        "Traceback (most recent call last):",
        '  File "ray/train/v2/placement_group_cleaner.py", line 80, in _monitor_loop',
        "    alive = is_actor_alive(",
        "ConnectionError: Found multiple active Ray instances: {'a', 'b'}.",
    ]
    real = [
        "Traceback (most recent call last):",
        '  File "pipelines/train.py", line 3, in <module>',
        "ValueError: the store has no rows",
    ]
    err.write("\n".join([*harmless, "a library's info line", *real]) + "\n")
    err.close_pending()
    assert term.getvalue().splitlines() == real
    assert log.getvalue().splitlines() == [*harmless, "a library's info line", *real]
