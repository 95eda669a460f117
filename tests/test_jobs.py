"""jobs/select.py as a user runs it: one error line for bad input, whatever else is given; --data alone runs, on
the project's own console."""
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import job

REPO = Path(__file__).resolve().parents[1]


def _select(args: list[str], cwd, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "jobs" / "select.py"), *args], cwd=cwd, capture_output=True,
                          text=True, timeout=timeout)


def _select_here(args: list[str], capsys) -> tuple[int, str]:
    """``jobs/select.py``'s own main in this process, on the session's Ray: (exit status, stderr). The refusals
    below run here (a subprocess only adds Python's and the libraries' start-up); ``_select`` runs the command."""
    capsys.readouterr()
    rc = job("select").main(args)
    return rc, capsys.readouterr().err


@pytest.mark.parametrize("data,extra,message", [
    ("bad.jsonl", ["--set", "text.tokenizer=/nonexistent/tokenizer"], r"bad\.jsonl:2: malformed JSON"),
    ("bad.jsonl", ["--proxy-model", "/nonexistent/model"], r"bad\.jsonl:2: malformed JSON"),
    ("bad.jsonl", [], r"bad\.jsonl:2: malformed JSON"),
    ("missing.jsonl", [], r"corpus path does not exist: .*missing\.jsonl"),
    ("missing.jsonl", ["--proxy-model", "/nonexistent/model"], r"corpus path does not exist"),
    ("good.jsonl", ["--set", "text.tokenizer=/nonexistent/tokenizer"], r"tokenizer directory does not exist"),
])
def test_bad_input_gives_one_error_line_whatever_else_is_given(ray_local, tmp_path, data, extra, message, capsys):
    """Data errors are reported first, before any model or tokenizer error, with or without them."""
    (tmp_path / "bad.jsonl").write_text('{"prompt": "p", "response": "r"}\n{"prompt": "p2"\n')
    (tmp_path / "good.jsonl").write_text('{"prompt": "p", "response": "r"}\n')
    rc, stderr = _select_here(["--data", str(tmp_path / data), "--output", str(tmp_path / "r"), *extra], capsys)
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert rc == 2 and len(errors) == 1 and re.search(message, errors[0]), stderr[-2000:]


def test_unknown_config_key_is_refused(tmp_path):
    proc = _select(["--set", "proxy.epoch=2"], tmp_path)
    assert proc.returncode == 2 and "unknown key 'proxy.epoch'" in proc.stderr and "epochs" in proc.stderr


@pytest.mark.slow
def test_data_alone_runs_the_whole_selection_on_the_projects_own_console(tmp_path, demo_small):
    """`python jobs/select.py --data X.jsonl`: no model, no tokenizer, no other flag (output: ./runs/demo). The
    console is a few dozen lines of the project's own, each once, none of Ray's internal warnings or progress-bar
    debris; with --verbose (everything reused) Ray's own output is back."""
    rows = [json.loads(line) for line in open(demo_small["train"])]
    data = tmp_path / "mine.jsonl"
    data.write_text("".join(json.dumps({**r, "prompt": f"{r['prompt']} (case {k})"}) + "\n"
                            for k in range(4) for r in rows))  # 240 rows: room for the default K=100
    proc = _select(["--data", str(data)], tmp_path, timeout=900)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    out = tmp_path / "runs" / "demo"
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["config"]["text"]["tokenizer"] == str(out / "tokenizer") and not manifest["demo"]
    assert (out / "tokenizer" / "tokenizer.json").is_file() and manifest["clusters"]["k"] == 100
    assert manifest["selection"]["budgets"] == {"24": manifest["selection"]["budgets"]["24"]}
    assert f"next: python jobs/finetune.py --data {out} --model /path/to/your/target-model" in proc.stdout
    lines = [line for line in (proc.stdout + proc.stderr).splitlines() if line.strip()]
    stamped = [line for line in lines if re.match(r"\[(s2l|proxy|scoring) \d\d:\d\d:\d\d\] ", line)]
    assert len(set(stamped)) == len(stamped)  # each project line once
    points = manifest["config"]["proxy"]["num_points"]
    assert len([line for line in stamped if re.search(r"^\[proxy .*\] point \d+/\d+ at step", line)]) == points
    assert len([line for line in stamped if re.search(r"^\[scoring .*\] point \d+: \d+ rows scored", line)]) == points
    # besides a line per point trained and scored, and the lines of stages slow enough to report progress
    # (``done/total unit (rate)``, every 10 s), a few dozen lines
    rest = [line for line in lines if not re.search(r"\] (point \d+|\d[\d,]*/\d[\d,]* \w+ \()", line)]
    assert len(rest) <= 34, "\n".join(lines)
    assert not [line for line in lines if "core_worker" in line or "\x1b[" in line or "\r" in line
                or "RayTrainWorker" in line or "Running Dataset" in line], "\n".join(lines)
    assert any("report:" in line and "report.html" in line for line in lines)
    verbose = _select(["--data", str(data), "--verbose"], tmp_path, timeout=900)
    assert verbose.returncode == 0, verbose.stderr[-2000:]
    assert re.search(r"Started a local Ray instance|Starting execution of Dataset", verbose.stdout + verbose.stderr)


def test_no_argument_is_the_built_in_demo(tmp_path):
    """`python jobs/select.py` alone is the demo (configs/demo.yaml): its plan, without running it."""
    proc = _select(["--dry-run"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "running the built-in demo" in proc.stdout and "demo.yaml" in proc.stdout


@pytest.mark.parametrize("extra,message", [
    (["--method", "s2l-target"], r"select\.method 's2l-target' needs target examples: give --target"),
    (["--method", "random-per-source", "--set", "cluster.source_split=target"],
     r"select\.method 'random-per-source' with source split target needs target examples"),
    (["--method", "s2l-target", "--target", "missing.jsonl"], r"corpus path does not exist: .*missing\.jsonl"),
    (["--set", "cluster.source_split=even"], r"cluster\.source_split must be auto or one of"),
    (["--method", "embedding-target", "--target", "good.jsonl", "--set", "select.embedding_rank=max"],
     r"select\.embedding_rank must be one of \['nearest', 'mean'\]"),
    (["--method", "s2l-target", "--target", "bad.jsonl"], r"bad\.jsonl:2: malformed JSON"),
])
def test_target_settings_are_refused_before_any_work(ray_local, tmp_path, extra, message, capsys, monkeypatch):
    (tmp_path / "good.jsonl").write_text('{"prompt": "p", "response": "r"}\n')
    (tmp_path / "bad.jsonl").write_text('{"prompt": "p", "response": "r"}\n{"prompt": "p2"\n')
    monkeypatch.chdir(tmp_path)  # the relative --target paths
    rc, stderr = _select_here(["--data", str(tmp_path / "good.jsonl"), "--output", str(tmp_path / "r"), *extra],
                              capsys)
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert rc == 2 and len(errors) == 1 and re.search(message, errors[0]), stderr[-2000:]
    assert not (tmp_path / "r").exists()  # refused before anything was written


@pytest.mark.parametrize("extra,message", [
    (["--budget", "0"], r"select\.budgets: 0(\.0)? is neither a whole count >= 1 nor a fraction in \(0, 1\)"),
    (["--set", "text.template=Question: answer this"], r"text\.template must contain \{prompt\}"),
    (["--num-workers", "0"], r"proxy\.workers\.count must be at least 1, not 0"),
    (["--set", "proxy.schedule=step"], r"proxy\.schedule must be cosine, linear or constant, not 'step'"),
    (["--set", "proxy.grad_clip=-1"], r"proxy\.grad_clip must be 0 \(no clipping\) or more, not -1"),
    (["--set", "proxy.grad_accum=0"], r"proxy\.grad_accum must be at least 1, not 0"),
    (["--set", "tracking.backend=neptune"], r"tracking\.backend must be one of \['none', 'mlflow', 'wandb'\]"),
    (["--set", "proxy.workers.resources=spot"], r"proxy\.workers\.resources"),
    (["--set", "proxy.use_gpu=true", "--set", "proxy.workers.gpus=0.5"],
     r"proxy\.workers\.gpus=0\.5 with 2 workers can put two training ranks on one GPU"),
])
def test_bad_settings_are_refused_on_the_real_path_before_any_work(ray_local, tmp_path, demo_small, extra, message,
                                                                   capsys):
    """What ``--dry-run`` checks, a real run checks before it reads a row (the GPUs' sharing as soon as Ray runs)."""
    rc, stderr = _select_here(["--data", demo_small["train"], "--set", f"text.tokenizer={demo_small['tokenizer']}",
                               "--output", str(tmp_path / "r"), *extra], capsys)
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert rc == 2 and len(errors) == 1 and re.search(message, errors[0]), stderr[-2000:]
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("extra,message", [
    (["--budget", "500"], r"select\.budgets: budget 500 is larger than the corpus \(60 examples\)"),  # before points
    (["--budget", "0.001"], r"select\.budgets: budget fraction 0\.001 of 60 examples selects none"),
    (["--budget", "30,0.5"], r"select\.budgets \[30(\.0)?, 0\.5\] resolve to repeated counts \[30, 30\]"),
    ([], r"proxy\.num_points=12 must be between 1 and the 6 training steps \(60 rows over 2 workers in batches "
         r"of 16, 3 epochs\)"),
])
def test_what_the_corpus_size_decides_is_refused_before_the_proxy_trains(ray_local, tmp_path, demo_small, extra,
                                                                         message, capsys):
    """The budgets and the trajectory points against the stored corpus's rows: refused after the ingest, with
    nothing trained or scored."""
    rc, stderr = _select_here(["--data", demo_small["train"], "--set", f"text.tokenizer={demo_small['tokenizer']}",
                               "--output", str(tmp_path / "r"), "--budget", "6", *extra], capsys)
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert rc == 2 and len(errors) == 1 and re.search(message, errors[0]), stderr[-2000:]
    run = tmp_path / "r"
    assert (run / "corpus").is_dir() and not (run / "proxy").exists() and not (run / "trajectories").exists()


def test_an_error_raised_while_handling_ours_is_not_reported_as_ours():
    """``main`` reports the project's error behind what it was raised from, never one that was merely being handled
    when an internal failure happened (that one keeps its traceback)."""
    from s2l_ray.config import ConfigError
    from s2l_ray.cli import main

    def internal_failure_while_handling():
        try:
            raise ConfigError("a user error")
        except ConfigError:
            raise KeyError("an internal failure")  # noqa: B904 - the point of the test

    def wrapped():
        try:
            raise ConfigError("a user error")
        except ConfigError as e:
            raise RuntimeError("a wrapper") from e

    with pytest.raises(KeyError):
        main(internal_failure_while_handling)
    assert main(wrapped) == 2


def test_placement_is_one_shape_and_a_partial_mapping_keeps_its_stages_defaults(tmp_path):
    from s2l_ray.config import ConfigError, FinetuneConfig, Placement, load_config

    path = tmp_path / "c.yaml"
    path.write_text("proxy:\n  workers:\n    cpus: 0.5\nscoring:\n  actors:\n    count: 4\n")
    cfg = load_config(str(path), {"proxy.workers.resources": "node2=1"})
    assert cfg.proxy.workers == Placement(count=2, cpus=0.5, gpus=1.0, resources=["node2=1"])
    assert cfg.scoring.actors == Placement(count=4, cpus=0.5, gpus=0.25)  # the scoring actors' own defaults
    assert cfg.proxy.workers.ray_resources(True, "proxy.workers") == {"CPU": 0.5, "GPU": 1.0, "node2": 1.0}
    assert cfg.scoring.actors.ray_resources(False, "scoring.actors") == {"CPU": 0.5}
    assert load_config(None, {"workers.count": 4}, cls=FinetuneConfig).workers == Placement(count=4)
    path.write_text("proxy:\n  num_workers: 2\n")
    with pytest.raises(ConfigError, match=r"unknown key\(s\) \['num_workers'\].*'workers'"):
        load_config(str(path))
