"""Every corpus format loads into the same normalised rows; bad input gets one clear error."""
import json
import re

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from s2l_ray.config import CorpusConfig, TextConfig
from s2l_ray.corpus import CorpusError, discover, plan_pieces, row_id, store
from s2l_ray.layout import STORED_SCHEMA, RunDir

ROWS = [
    {"id": "a", "source": "math", "prompt": "What is 2+2?", "response": "#### 4"},
    {"id": "b", "source": "math", "prompt": "What is 3*3?", "response": "3*3 = 9\n#### 9"},
    {"id": "c", "source": "code", "prompt": "Print hi", "response": "print('hi')"},
]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def load(tmp_path, demo_small, path, text=None, part_rows=8192, piece_bytes=32 << 20, **kw):
    run = RunDir(str(tmp_path / "run"))
    stats = store(run, CorpusConfig(path=str(path), **kw), text or TextConfig(), demo_small["tokenizer"],
                  part_rows=part_rows, piece_bytes=piece_bytes)
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
    spans, ids = t.column("spans").to_pylist(), t.column("input_ids").to_pylist()
    assert all(len(sp) == 2 and 0 < sp[0] < sp[1] == len(i) for sp, i in zip(spans, ids))
    assert stats["part_rows"] == [3] and stats["dropped"] == dict.fromkeys(
        ["empty_prompt", "empty_response", "duplicate_id", "no_response_tokens"], 0)


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


def test_chat_messages_and_sharegpt(tmp_path, demo_small):
    rows = [{"id": 1, "messages": [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Hello"}]},
            {"id": 2, "messages": [{"role": "system", "content": "Be brief"}, {"role": "user", "content": "2+2"},
                                   {"role": "assistant", "content": "4"}, {"role": "user", "content": "3+3"},
                                   {"role": "assistant", "content": "6"}]},
            {"id": 3, "conversations": [{"from": "human", "value": "1+1"}, {"from": "gpt", "value": "2"}]}]
    _, t = load(tmp_path, demo_small, write_jsonl(tmp_path / "chat.jsonl", rows))
    got = as_rows(t)
    assert got[0] == {"id": "1", "source": "default", "prompt": "Hi?", "response": "Hello"}
    assert got[1]["prompt"] == "3+3" and got[1]["response"] == "6"  # the last question and answer
    assert json.loads(t.column("messages")[1].as_py()) == rows[1]["messages"]
    assert json.loads(t.column("messages")[2].as_py()) == [{"role": "user", "content": "1+1"},
                                                           {"role": "assistant", "content": "2"}]
    assert [len(sp) for sp in t.column("spans").to_pylist()] == [2, 4, 2]  # every assistant turn


def test_other_tools_schemas(tmp_path, demo_small):
    gsm = [{"question": "Tom has 3 apples and buys 2. How many?", "answer": "3 + 2 = <<3+2=5>>5\n#### 5"}]
    alpaca = [{"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"},
              {"instruction": "Say hi.", "input": "", "output": "hi"}]
    math = [{"problem": "What is $1/2 + 1/4$?", "solution": "It is $\\boxed{\\frac{3}{4}}$."}]
    _, t = load(tmp_path / "a", demo_small, write_jsonl(tmp_path / "gsm.jsonl", gsm))
    assert as_rows(t)[0]["prompt"] == gsm[0]["question"] and as_rows(t)[0]["response"] == gsm[0]["answer"]
    _, t = load(tmp_path / "b", demo_small, write_jsonl(tmp_path / "alpaca.jsonl", alpaca))
    assert [r["prompt"] for r in as_rows(t)] == ["Add the numbers.\n2 and 3", "Say hi."]
    _, t = load(tmp_path / "c", demo_small, write_jsonl(tmp_path / "math.jsonl", math))
    assert as_rows(t)[0]["response"] == math[0]["solution"]
    (tmp_path / "alpaca.json").write_text(json.dumps(alpaca, indent=2))  # one JSON array, as Alpaca ships it
    _, t = load(tmp_path / "d", demo_small, tmp_path / "alpaca.json")
    assert [r["prompt"] for r in as_rows(t)] == ["Add the numbers.\n2 and 3", "Say hi."]
    (tmp_path / "broken.json").write_text('[{"instruction": "a", "output": "b"},')
    with pytest.raises(CorpusError, match=r"broken\.json: malformed JSON array"):
        load(tmp_path / "e", demo_small, tmp_path / "broken.json")


def test_truncation_is_counted(tmp_path, demo_small):
    rows = ROWS + [{"id": "d", "prompt": "short", "response": "long answer " * 100}]
    stats, t = load(tmp_path, demo_small, write_jsonl(tmp_path / "t.jsonl", rows), text=TextConfig(max_length=40))
    assert stats["truncated"] == 1 and max(t.column("n_tokens").to_pylist()) == 40


@pytest.mark.parametrize("content,kw,match", [
    (b"", {}, "is empty"),
    (b'{"prompt": "p", "response": "r"}\n{"prompt": "p2", "response": \n', {}, r"bad\.jsonl:2: malformed JSON"),
    (b'{"prompt": "p", "response": "r"}\n{"prompt": "caf\xe9", "response": "r"}\n', {}, r"bad\.jsonl:2: not valid UTF-8"),
    (b'{"prompt": "p", "reply": "r"}\n', {}, r"bad\.jsonl:1: missing field 'response'"),
    (b'{"q": "p", "response": "r"}\n', {"prompt": "question"}, r"bad\.jsonl:1: missing field 'question'"),
    (b'{"prompt": "p", "response": 5}\n', {}, r"bad\.jsonl:1: field 'response' must be a string"),
    (b'{"messages": [{"role": "user", "content": "q"}, {"role": "robot", "content": "a"}]}\n', {},
     r"bad\.jsonl:1: field 'messages' turn 1 has role 'robot'"),
    (b'[1, 2]\n', {}, r"bad\.jsonl:1: expected a JSON object"),
    # what is dropped and counted by default is an error with corpus.strict
    (b'{"prompt": "p", "response": "r"}\n{"prompt": "p", "response": "  "}\n', {"strict": True},
     r"bad\.jsonl:2: the response is empty"),
    (b'{"prompt": "", "response": "r"}\n', {"strict": True}, r"bad\.jsonl:1: the prompt is empty"),
    (b'{"id": 7, "prompt": "a", "response": "r"}\n{"id": 7, "prompt": "b", "response": "s"}\n', {"strict": True},
     r"bad\.jsonl:2: duplicate id.*'7'"),
    (b'{"id": "x", "prompt": "' + b"word " * 300 + b'", "response": "r"}\n', {"strict": True},
     r"bad\.jsonl:1: no response token is left after truncation.*'x'"),
])
def test_bad_input_is_refused_clearly(tmp_path, demo_small, content, kw, match):
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(content)
    run = RunDir(str(tmp_path / "run"))
    with pytest.raises(Exception) as info:
        store(run, CorpusConfig(path=str(bad), **kw), TextConfig(max_length=64), demo_small["tokenizer"])
    from s2l_ray.cli import user_error

    err = user_error(info.value)
    assert isinstance(err, CorpusError), info.value
    assert re.search(match, str(err)), str(err)
    assert not (tmp_path / "run" / "corpus").exists(), "a failed corpus leaves no partial output"


def test_bad_rows_are_dropped_counted_and_named(tmp_path, demo_small):
    rows = [*ROWS, {"id": "e1", "prompt": " ", "response": "r"}, {"id": "e2", "prompt": "p", "response": ""},
            {"id": "a", "prompt": "again", "response": "dup"}, {"id": "long", "prompt": "word " * 300, "response": "r"},
            {"id": "c2", "messages": [{"role": "user", "content": "q"}]}]
    stats, t = load(tmp_path, demo_small, write_jsonl(tmp_path / "t.jsonl", rows), text=TextConfig(max_length=64))
    assert as_rows(t) == ROWS and t.column("idx").to_pylist() == [0, 1, 2]
    assert stats["rows"] == 3 and stats["dropped"] == {"empty_prompt": 1, "empty_response": 2, "duplicate_id": 1,
                                                       "no_response_tokens": 1}
    assert stats["dropped_ids"] == {"empty_prompt": ["e1"], "empty_response": ["e2", "c2"], "duplicate_id": ["a"],
                                    "no_response_tokens": ["long"]}
    from s2l_ray.corpus import drop_summary

    assert "1 duplicate id (ids ['a'])" in drop_summary(stats)


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
    assert [p.num_rows for p in parts] == [16, 16, 16, 2] == stats["part_rows"]  # scored in parallel, part by part
    table = pa.concat_tables(parts)
    assert table.column("idx").to_pylist() == list(range(50)) and as_rows(table) == rows


def _big_rows(n):
    return [{"id": f"r{i}", "source": f"s{i // 700}", "prompt": f"What is {i} + {i % 7}?",
             "response": f"{i} + {i % 7} = {i + i % 7}\n#### {i + i % 7}"} for i in range(n)]


def test_a_large_file_read_in_pieces_equals_a_serial_read(tmp_path, demo_small):
    """One JSONL file of 3,000 rows (written sorted by source) read in many pieces, with duplicates
    across pieces: the same parts, idx, ids and fingerprint as a read in one piece."""
    rows = _big_rows(3000)
    rows[2500] = dict(rows[10])  # a duplicate of a row in another piece: the first one is kept
    path = write_jsonl(tmp_path / "big.jsonl", rows)
    pieces = plan_pieces("jsonl", [str(path)], path.stat().st_size // 5)
    assert len(pieces) >= 5
    one, t1 = load(tmp_path / "serial", demo_small, path, part_rows=256)
    many, t2 = load(tmp_path / "pieces", demo_small, path, part_rows=256, piece_bytes=path.stat().st_size // 5)
    assert one["pieces"] == 1 and many["pieces"] == len(pieces)
    assert t1.equals(t2) and one["fingerprint"] == many["fingerprint"] and one["part_rows"] == many["part_rows"]
    assert t2.column("idx").to_pylist() == list(range(2999))
    assert t2.column("id").to_pylist() == [r["id"] for i, r in enumerate(rows) if i != 2500]
    assert many["dropped"]["duplicate_id"] == 1 and many["dropped_ids"]["duplicate_id"] == ["r10"]


def test_an_error_deep_in_a_piece_names_the_files_own_line(tmp_path, demo_small):
    rows = _big_rows(3000)
    path = tmp_path / "big.jsonl"
    lines = [json.dumps(r) for r in rows]
    size = sum(len(x) + 1 for x in lines)
    at = next(i for i in range(len(lines)) if sum(len(x) + 1 for x in lines[:i]) > size * 2.5 / 5)  # in piece 3
    lines[at] = lines[at][:-5]
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(CorpusError, match=rf"big\.jsonl:{at + 1}: malformed JSON"):
        load(tmp_path, demo_small, path, piece_bytes=size // 5)


def test_parquet_row_groups_and_arrow_shards_are_pieces(tmp_path, demo_small):
    import datasets

    rows = _big_rows(2000)
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "c.parquet", row_group_size=300)
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "hf"), num_shards=3)
    serial, t0 = load(tmp_path / "serial", demo_small, tmp_path / "c.parquet", part_rows=256)
    grouped, t1 = load(tmp_path / "pq", demo_small, tmp_path / "c.parquet", part_rows=256, piece_bytes=1)
    shards, t2 = load(tmp_path / "hf_run", demo_small, tmp_path / "hf", part_rows=256)
    assert serial["pieces"] == 1 and grouped["pieces"] == 7 and shards["pieces"] == 3
    origin = ["origin", "origin_row", "origin_offset"]
    assert t0.equals(t1) and t0.drop_columns(origin).equals(t2.drop_columns(origin)) and as_rows(t0) == rows
    assert t0.column("origin_row").to_pylist() == list(range(2000)) and set(t0.column("origin").to_pylist()) == {0}
    assert set(t0.column("origin_offset").to_pylist()) == {-1}
    shard, at = t2.column("origin").to_numpy(), t2.column("origin_row").to_numpy()  # each shard's own rows
    assert list(np.unique(shard)) == [0, 1, 2] and all(
        (at[shard == k] == np.arange((shard == k).sum())).all() for k in range(3))
    assert serial["fingerprint"] == grouped["fingerprint"] == shards["fingerprint"]
    bad = [dict(r) for r in rows]
    bad[1234]["response"] = None
    pq.write_table(pa.Table.from_pylist(bad), tmp_path / "bad.parquet", row_group_size=300)
    with pytest.raises(CorpusError, match=r"bad\.parquet row 1234: field 'response' must be a string"):
        load(tmp_path / "bad", demo_small, tmp_path / "bad.parquet", piece_bytes=1)


def test_a_failed_call_stops_submission_and_waits_for_the_calls_in_flight(tmp_path):
    import ray

    from s2l_ray.corpus.executor import map_in_order

    def marked(i: int, folder: str) -> int:  # defined here so that Ray ships it by value
        """Marks its start, fails for call 1, and marks its end a second later otherwise."""
        import pathlib
        import time

        pathlib.Path(folder, f"start-{i}").touch()
        if i == 1:
            raise ValueError("call 1 failed")
        time.sleep(1.0)
        pathlib.Path(folder, f"done-{i}").touch()
        return i

    task = ray.remote(marked).options(num_cpus=1, max_retries=0)
    assert map_in_order(task, [(i, str(tmp_path)) for i in (0, 2, 3, 4, 5, 6, 7, 8, 9)]) == [0, 2, 3, 4, 5, 6, 7,
                                                                                            8, 9]
    for f in tmp_path.iterdir():
        f.unlink()
    window = 2 * int(ray.cluster_resources()["CPU"])  # 4 on the tests' 2-CPU Ray
    with pytest.raises(ValueError, match="call 1 failed"):
        map_in_order(task, [(i, str(tmp_path)) for i in range(10)])
    started = sorted(int(f.name.split("-")[1]) for f in tmp_path.glob("start-*"))
    done = sorted(int(f.name.split("-")[1]) for f in tmp_path.glob("done-*"))
    assert started == list(range(window + 1))  # call 0 returned, so one more went in; none after the failure
    assert done == [i for i in started if i != 1]  # every call in flight finished before the error came out
