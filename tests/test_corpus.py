"""Every corpus format loads into the same normalised rows; bad input gets one clear error."""
import json
import re

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from s2l_ray.config import CorpusConfig, TextConfig
from s2l_ray.corpus import CorpusError, STORED_SCHEMA, discover, row_id, store
from s2l_ray.layout import RunDir

ROWS = [
    {"id": "a", "source": "math", "prompt": "What is 2+2?", "response": "#### 4"},
    {"id": "b", "source": "math", "prompt": "What is 3*3?", "response": "3*3 = 9\n#### 9"},
    {"id": "c", "source": "code", "prompt": "Print hi", "response": "print('hi')"},
]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def load(tmp_path, demo_small, path, text=None, **kw):
    run = RunDir(str(tmp_path / "run"))
    stats = store(run, CorpusConfig(path=str(path), **kw), text or TextConfig(), demo_small["tokenizer"])
    table = pq.read_table([run.corpus_part(i) for i in range(len(stats["files"]))])
    return stats, table


def as_rows(table):
    return [{k: r[k] for k in ("id", "source", "prompt", "response")} for r in table.to_pylist()]


@pytest.fixture(autouse=True)
def _ray(ray_local):
    yield


def test_jsonl(tmp_path, demo_small):
    stats, t = load(tmp_path, demo_small, write_jsonl(tmp_path / "c.jsonl", ROWS))
    assert t.schema == STORED_SCHEMA
    assert as_rows(t) == ROWS and t.column("idx").to_pylist() == [0, 1, 2]
    assert stats["rows"] == 3 and stats["sources"] == {"math": 2, "code": 1} and stats["truncated"] == 0
    n_prompt, ids = t.column("n_prompt").to_pylist(), t.column("input_ids").to_pylist()
    assert all(0 < p < len(i) for p, i in zip(n_prompt, ids))


def test_parquet_hf_and_shards_give_the_same_rows(tmp_path, demo_small):
    import datasets

    pq.write_table(pa.Table.from_pylist(ROWS), tmp_path / "c.parquet")
    datasets.Dataset.from_list(ROWS).save_to_disk(str(tmp_path / "hf"))
    (tmp_path / "shards").mkdir()
    write_jsonl(tmp_path / "shards" / "part-0.jsonl", ROWS[:2])
    write_jsonl(tmp_path / "shards" / "part-1.jsonl", ROWS[2:])
    fps = set()
    for i, p in enumerate([tmp_path / "c.parquet", tmp_path / "hf", tmp_path / "shards"]):
        stats, t = load(tmp_path / str(i), demo_small, p)
        assert as_rows(t) == ROWS, p
        fps.add(stats["fingerprint"])
    assert len(fps) == 1
    assert discover(CorpusConfig(path=str(tmp_path / "hf")))[0] == "hf"


def test_column_mapping_derived_ids_and_default_source(tmp_path, demo_small):
    rows = [{"q": r["prompt"], "a": r["response"]} for r in ROWS]
    _, t = load(tmp_path, demo_small, write_jsonl(tmp_path / "m.jsonl", rows), prompt="q", response="a")
    got = as_rows(t)
    assert [r["source"] for r in got] == ["default"] * 3
    assert [r["id"] for r in got] == [row_id("default", r["prompt"], r["response"]) for r in ROWS]
    _, t2 = load(tmp_path / "again", demo_small, tmp_path / "m.jsonl", prompt="q", response="a")
    assert t2.column("id").to_pylist() == t.column("id").to_pylist()  # stable


def test_chat_messages(tmp_path, demo_small):
    rows = [{"id": 1, "messages": [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Hello"}]},
            {"id": 2, "messages": [{"role": "system", "content": "Be brief"}, {"role": "user", "content": "2+2"},
                                   {"role": "assistant", "content": "4"}]}]
    _, t = load(tmp_path, demo_small, write_jsonl(tmp_path / "chat.jsonl", rows))
    got = as_rows(t)
    assert got[0]["prompt"] == "Hi?" and got[0]["response"] == "Hello" and got[0]["id"] == "1"
    assert got[1]["prompt"] == "system: Be brief\nuser: 2+2" and got[1]["response"] == "4"


def test_truncation_is_counted(tmp_path, demo_small):
    rows = ROWS + [{"id": "d", "prompt": "short", "response": "long answer " * 100}]
    stats, t = load(tmp_path, demo_small, write_jsonl(tmp_path / "t.jsonl", rows), text=TextConfig(max_length=40))
    assert stats["truncated"] == 1 and max(t.column("n_tokens").to_pylist()) == 40


@pytest.mark.parametrize("content,kw,match", [
    (b"", {}, "is empty"),
    (b'{"prompt": "p", "response": "r"}\n{"prompt": "p2", "response": \n', {}, r"bad\.jsonl:2: malformed JSON"),
    (b'{"prompt": "p", "response": "r"}\n{"prompt": "caf\xe9", "response": "r"}\n', {}, r"bad\.jsonl:2: not valid UTF-8"),
    (b'{"prompt": "p", "answer": "r"}\n', {}, r"bad\.jsonl:1: missing field 'response'"),
    (b'{"q": "p", "response": "r"}\n', {"prompt": "question"}, r"bad\.jsonl:1: missing field 'question'"),
    (b'{"prompt": "p", "response": "r"}\n{"prompt": "p", "response": "  "}\n', {}, r"bad\.jsonl:2: field 'response' is empty"),
    (b'{"prompt": "", "response": "r"}\n', {}, r"bad\.jsonl:1: field 'prompt' is empty"),
    (b'{"id": 7, "prompt": "a", "response": "r"}\n{"id": 7, "prompt": "b", "response": "s"}\n', {}, r"duplicate ids \['7'\]"),
    (b'[1, 2]\n', {}, r"bad\.jsonl:1: expected a JSON object"),
])
def test_bad_input_is_refused_clearly(tmp_path, demo_small, content, kw, match):
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(content)
    run = RunDir(str(tmp_path / "run"))
    with pytest.raises(Exception) as info:
        store(run, CorpusConfig(path=str(bad), **kw), TextConfig(), demo_small["tokenizer"])
    from s2l_ray.pipeline import _user_error

    err = _user_error(info.value)
    assert isinstance(err, CorpusError), info.value
    assert re.search(match, str(err)), str(err)
    assert not (tmp_path / "run" / "corpus").exists(), "a failed corpus leaves no partial output"


def test_response_truncated_away_is_refused(tmp_path, demo_small):
    rows = ROWS + [{"id": "long", "prompt": "word " * 300, "response": "r"}]
    with pytest.raises(CorpusError, match=r"1 rows have no response tokens.*\['long'\]"):
        load(tmp_path, demo_small, write_jsonl(tmp_path / "t.jsonl", rows), text=TextConfig(max_length=64))


def test_missing_path_and_unknown_format(tmp_path):
    with pytest.raises(CorpusError, match="does not exist"):
        discover(CorpusConfig(path=str(tmp_path / "nope.jsonl")))
    (tmp_path / "x.csv").write_text("a,b\n")
    with pytest.raises(CorpusError, match="cannot tell the format"):
        discover(CorpusConfig(path=str(tmp_path / "x.csv")))
    (tmp_path / "empty").mkdir()
    with pytest.raises(CorpusError, match="holds no"):
        discover(CorpusConfig(path=str(tmp_path / "empty")))


def test_one_large_file_is_stored_in_parts_of_part_rows(tmp_path, demo_small):
    rows = [{"id": f"r{i}", "source": "math", "prompt": f"What is {i}+1?", "response": f"#### {i + 1}"}
            for i in range(50)]
    run = RunDir(str(tmp_path / "run"))
    stats = store(run, CorpusConfig(path=str(write_jsonl(tmp_path / "big.jsonl", rows))), TextConfig(),
                  demo_small["tokenizer"], part_rows=16)
    parts = [pq.read_table(run.corpus_part(i)) for i in range(len(stats["files"]))]
    assert [p.num_rows for p in parts] == [16, 16, 16, 2]  # scored in parallel, part by part
    table = pa.concat_tables(parts)
    assert table.column("idx").to_pylist() == list(range(50)) and as_rows(table) == rows
