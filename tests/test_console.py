"""The console of a short stage run (`raylm pretrain`, two Ray Train workers, in a pipe): raylm's
own lines only, each once, no colour codes; what Ray and Ray Train printed is in the stage's
logs/ray.log, logged to its MLflow run."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from raylm.console import Console, progress_bar
from test_train_pretrain import VOCAB, build_shards

REPO = Path(__file__).resolve().parents[1]
# What raylm prints: stage headers and summaries, its [stage] lines, the closing JSON summary.
RAYLM_LINE = re.compile(r'^(=== raylm |raylm |\[pretrain\] |[{}]$|  "|\s*[\]}],?$|\s+[-\d.e+]+,?$|\s+"[^"]*",?$)')
# What Ray, Ray Train and vLLM print, and ANSI colour codes.
FOREIGN = re.compile(r"pid=|\x1b\[|core_worker|INFO|WARNING|PlacementGroup|Ray Train|vllm|raylet|Started a local Ray")


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return build_shards(tmp_path_factory.mktemp("shards"), n_documents=200)


def run_pretrain(tmp_path, shards, *extra) -> tuple[list[str], Path]:
    tmp_path.mkdir(parents=True, exist_ok=True)
    out = tmp_path / "out"
    config = tmp_path / "pretrain.yaml"
    config.write_text(
        f"output_dir: {out}\ndata_dir: {shards}\nray:\n  num_cpus: 2\nmodel:\n  preset: debug\n  vocab_size: {VOCAB}\n"
        "train:\n  steps: 3\n  batch_size: 2\n  seq_len: 32\n  log_every: 1\n  eval_every: 3\n  eval_batches: 1\n"
        "  checkpoint_every: 3\nparallel:\n  num_workers: 2\n")
    proc = subprocess.run([sys.executable, "-m", "raylm.cli", "pretrain", str(config), *extra],
                          capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return (proc.stdout + proc.stderr).splitlines(), out


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_console_shows_raylms_lines_once_and_ray_goes_to_the_log(tmp_path, shards):
    lines, out = run_pretrain(tmp_path / "quiet", shards)
    text = "\n".join(lines)
    assert lines[0].startswith("=== raylm pretrain")
    assert "[pretrain] step 3/3" in text  # progress from the Ray Train workers reaches the console
    foreign = [line for line in lines if not RAYLM_LINE.match(line) or "\x1b[" in line
               or (FOREIGN.search(line) and not line.startswith("raylm pretrain: "))]
    assert not foreign, "not raylm's lines on the console:\n" + "\n".join(foreign[:20])
    shown = [line for line in lines if line.strip() and not re.fullmatch(r"\s*[\]{}],?", line)]
    repeated = {line for line in shown if shown.count(line) > 1}
    assert not repeated, f"lines shown more than once: {sorted(repeated)[:10]}"

    # The workers' output is not lost: it is in the stage's log, and that log is in MLflow.
    log = out / "logs" / "ray.log"
    logged = log.read_text()
    assert "pid=" in logged and "[pretrain] step 3/3" in logged
    client = MlflowClient(f"sqlite:///{out / 'mlflow.db'}")
    [run] = client.search_runs([client.get_experiment_by_name("raylm").experiment_id])
    assert "logs/ray.log" in {a.path for a in client.list_artifacts(run.info.run_id, "logs")}

    # Ray and Ray Train did print lines the console check above refuses: they went to the log.
    assert any(FOREIGN.search(line) for line in logged.splitlines() if not RAYLM_LINE.match(line))


def test_step_lines_are_a_bar_on_a_terminal_and_plain_in_a_pipe(tmp_path):
    class Terminal:
        def __init__(self):
            self.text = ""

        def write(self, s):
            self.text += s

        def flush(self):
            pass

        def isatty(self):
            return True

    console, tty = Console(), Terminal()
    console.show("[sft] step 1/4 loss 2.5", tty)
    console.show("[sft] step 2/4 loss 2.0", tty)
    console.show("[sft] wrote the final model", tty)
    assert tty.text.count("\r\x1b[K") == 2 and "\n" not in tty.text.split("\n[sft] wrote")[0]  # one line, redrawn
    assert tty.text.endswith("\n[sft] wrote the final model\n")  # the bar's line is closed first
    assert progress_bar("[sft] step 2/4 loss 2.0") == "[sft] " + "█" * 12 + "░" * 12 + " 2/4 loss 2.0"

    pipe = tmp_path / "pipe.txt"
    with pipe.open("w") as f:
        console.show("[sft] step 1/4 loss 2.5", f)
        console.show("[sft] step 1/4 loss 2.5", f, once=True)  # a line every rank printed: once
    assert pipe.read_text() == "[sft] step 1/4 loss 2.5\n"


def test_what_a_library_prints_on_the_driver_goes_to_the_log(tmp_path, capsys, monkeypatch):
    """Ray Tune prints its tables with print() on the driver, even at verbose=0: inside
    ``library_prints_to_log`` they go to the log file, while the workers' raylm lines still reach
    the console; with --verbose everything is printed as it is."""
    console = Console()
    console.log_to(tmp_path / "ray.log")
    with console.library_prints_to_log():
        print("+--------------------+\n| Trial name  status |")
        print("Trial status: 6", "TERMINATED")  # print() writes its pieces one by one: one line
        console.on_worker_output({"lines": ["raylm scale: trial n1-c1 done", "(worker noise)"], "pid": 7})
    print("[scale] back on the console")
    assert capsys.readouterr().out == "raylm scale: trial n1-c1 done\n[scale] back on the console\n"
    assert (tmp_path / "ray.log").read_text() == ("+--------------------+\n| Trial name  status |\nTrial status: 6 TERMINATED\n"
                                                  "(pid=7) raylm scale: trial n1-c1 done\n(pid=7) (worker noise)\n")
    console.verbose = True
    with console.library_prints_to_log():
        print("| Trial name  status |")
    assert capsys.readouterr().out == "| Trial name  status |\n"
