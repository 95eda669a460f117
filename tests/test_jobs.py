"""jobs/select.py as a user runs it: one error line for bad input, whatever else is given; --data alone runs."""
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _select(args: list[str], cwd, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "jobs" / "select.py"), *args], cwd=cwd, capture_output=True,
                          text=True, timeout=timeout)


@pytest.mark.parametrize("data,extra,message", [
    ("bad.jsonl", ["--set", "text.tokenizer=/nonexistent/tokenizer"], r"bad\.jsonl:2: malformed JSON"),
    ("bad.jsonl", ["--proxy-model", "/nonexistent/model"], r"bad\.jsonl:2: malformed JSON"),
    ("bad.jsonl", [], r"bad\.jsonl:2: malformed JSON"),
    ("missing.jsonl", [], r"corpus path does not exist: .*missing\.jsonl"),
    ("missing.jsonl", ["--proxy-model", "/nonexistent/model"], r"corpus path does not exist"),
    ("good.jsonl", ["--set", "text.tokenizer=/nonexistent/tokenizer"], r"tokenizer directory does not exist"),
])
def test_bad_input_gives_one_error_line_whatever_else_is_given(tmp_path, data, extra, message):
    """Data errors are reported first, before any model or tokenizer error, with or without them."""
    (tmp_path / "bad.jsonl").write_text('{"prompt": "p", "response": "r"}\n{"prompt": "p2"\n')
    (tmp_path / "good.jsonl").write_text('{"prompt": "p", "response": "r"}\n')
    proc = _select(["--data", str(tmp_path / data), "--output", str(tmp_path / "r"), *extra], tmp_path)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == 2 and len(errors) == 1 and re.search(message, errors[0]), proc.stderr[-2000:]


def test_unknown_config_key_is_refused(tmp_path):
    proc = _select(["--set", "proxy.epoch=2"], tmp_path)
    assert proc.returncode == 2 and "unknown key 'proxy.epoch'" in proc.stderr and "epochs" in proc.stderr


@pytest.mark.slow
def test_data_alone_trains_a_tokenizer_and_runs_the_whole_selection(tmp_path, demo_small):
    """`python jobs/select.py --data X.jsonl`: no model, no tokenizer, no other flag (output: ./runs/demo)."""
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
def test_target_settings_are_refused_before_any_work(tmp_path, extra, message):
    (tmp_path / "good.jsonl").write_text('{"prompt": "p", "response": "r"}\n')
    (tmp_path / "bad.jsonl").write_text('{"prompt": "p", "response": "r"}\n{"prompt": "p2"\n')
    proc = _select(["--data", str(tmp_path / "good.jsonl"), "--output", str(tmp_path / "r"), *extra], tmp_path)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == 2 and len(errors) == 1 and re.search(message, errors[0]), proc.stderr[-2000:]
    assert not (tmp_path / "r").exists()  # refused before anything was written
