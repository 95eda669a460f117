"""The subset in the user's own schema and the hand-offs to other trainers, on corpora in other tools' schemas.

Three corpora as users bring them: Alpaca JSONL in several parts sorted by source (``instruction``/``input``/
``output`` with a ``system`` column, nested metadata, non-ASCII text, odd spacing, a dropped row), ShareGPT
conversations in Parquet (``conversations`` of ``from``/``value`` with a system turn, a ``tools`` column, several
row groups), and a ``datasets.save_to_disk`` directory with features. For each: the original rows come back
verbatim (JSONL lines byte for byte, Parquet rows with the input's schema, the features kept), the selection
Parquet says where each came from, LLaMA-Factory's and axolotl's entries read the rows back to exactly the
prompts, responses and turns the project trained on (their documented semantics), and TRL's ``SFTTrainer`` trains
on the TRL Parquet.
"""
from __future__ import annotations

import gzip
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import yaml

from s2l_ray.config import ClusterConfig, CorpusConfig, SelectConfig, TextConfig, to_dict
from s2l_ray.corpus import store
from s2l_ray.layout import RunDir
from s2l_ray.selection.stage import select_run

TEMPLATE = "Question: {prompt}\nAnswer: "


def alpaca_rows(source: str, n: int) -> list[dict]:
    return [{"id": f"{source}-{i}", "source": source, "instruction": f"Solve №{i} for {source}",
             "input": "" if i % 3 else f"x = {i}  (é)", "output": f"The answer is {i * 7}." if i != 5 else "",
             "system": "You are careful.", "meta": {"difficulty": i % 4, "tags": ["a", source]}} for i in range(n)]


def write_alpaca(root) -> list:
    """Three parts, one source each; the last gzipped."""
    files = []
    for k, source in enumerate(("algebra", "geometry", "numbers")):
        path = root / (f"part-{k}.jsonl" if k < 2 else f"part-{k}.jsonl.gz")
        with (open(path, "w", encoding="utf-8") if k < 2 else gzip.open(path, "wt", encoding="utf-8")) as f:
            for i, r in enumerate(alpaca_rows(source, 12)):
                # what other tools write: unescaped UTF-8, varied spacing, a blank line
                f.write(json.dumps(r, ensure_ascii=False, separators=(",", ":") if i % 2 else (", ", ": ")) + "\n")
                if i == 4:
                    f.write("\n")
        files.append(path)
    return files


def sharegpt_rows(n: int) -> list[dict]:
    return [{"id": f"c{i}", "source": "chat" if i % 2 else "tools",
             "conversations": [{"from": "system", "value": "Be brief."},
                               {"from": "human", "value": f"What is {i} + {i}?"},
                               {"from": "gpt", "value": f"{2 * i}"},
                               {"from": "human", "value": "And doubled?"},
                               {"from": "gpt", "value": f"{4 * i}"}],
             "tools": json.dumps([{"name": "calc"}]) if i % 2 == 0 else None,
             "score": float(i) / 3} for i in range(n)]


def write_sharegpt(root) -> None:
    rows = sharegpt_rows(40)
    for k in range(2):
        pq.write_table(pa.Table.from_pylist(rows[k * 20:(k + 1) * 20]), root / f"chat-{k}.parquet", row_group_size=6)


def stored_run(tmp_path, corpus: CorpusConfig, tokenizer: str) -> RunDir:
    run = RunDir(str(tmp_path / "run"))
    run.ensure()
    text = TextConfig(tokenizer=tokenizer, template=TEMPLATE, max_length=128)
    stats = store(run, corpus, text, tokenizer, part_rows=7, piece_bytes=700)  # several pieces and parts
    run.update_manifest(corpus=stats, config={"corpus": to_dict(corpus), "text": to_dict(text)})
    return run


def select(run: RunDir, budget: int) -> None:
    select_run(run, SelectConfig(method="random", budgets=[budget]), ClusterConfig(), seed=3)


def normalised_selection(run: RunDir) -> list[dict]:
    return [json.loads(line) for line in open(run.selected_jsonl())]


def llamafactory_read(entry: dict, rows: list[dict]) -> list[dict]:
    """LLaMA-Factory's documented reading (data/README.md): alpaca joins prompt and query with a newline; sharegpt
    maps the role tags and takes a first system turn as the system prompt."""
    cols = entry["columns"]
    if entry["formatting"] == "alpaca":
        out = []
        for r in rows:
            prompt = "\n".join(p for p in (r[cols["prompt"]], r.get(cols.get("query", ""), "")) if p)
            out.append({"prompt": prompt, "response": r[cols["response"]], "system": r.get(cols.get("system", ""))})
        return out
    tags = entry["tags"]
    role = {tags["user_tag"]: "user", tags["assistant_tag"]: "assistant", tags["system_tag"]: "system",
            tags["observation_tag"]: "tool"}
    return [{"messages": [{"role": role[t[tags["role_tag"]]], "content": t[tags["content_tag"]]}
                          for t in r[cols["messages"]]]} for r in rows]


def axolotl_read(entry: dict, rows: list[dict]) -> list[dict]:
    """axolotl's documented reading: a custom instruction format is ``format`` (or ``no_input_format``) filled with
    the instruction and input fields, then the output; ``chat_template`` maps message fields and roles."""
    t = entry["type"]
    if t == "chat_template":
        m, roles = entry["message_property_mappings"], {v: k for k, vs in entry["roles"].items() for v in vs}
        return [{"messages": [{"role": roles[turn[m["role"]]], "content": turn[m["content"]]}
                              for turn in r[entry["field_messages"]]]} for r in rows]
    out = []
    for r in rows:
        extra = r.get(t.get("field_input", ""), "")
        fmt = t["format"] if extra else t["no_input_format"]
        out.append({"text": fmt.format(instruction=r[t["field_instruction"]], input=extra), "response": r[t["field_output"]]})
    return out


def test_alpaca_parts_come_back_verbatim_and_every_hand_off_reads_what_was_trained(ray_local, demo_small, tmp_path):
    files = write_alpaca(tmp_path)
    run = stored_run(tmp_path, CorpusConfig(path=str(tmp_path)), demo_small["tokenizer"])
    assert run.read_manifest()["corpus"]["dropped"]["empty_response"] == 3  # the row with an empty output, per source
    counted = {i["uri"]: i["records"] for i in run.read_manifest()["corpus"]["inputs"]}  # dropped rows included
    assert counted == {str(f): len((gzip.open(f) if f.suffix == ".gz" else open(f, "rb")).read().splitlines())
                       for f in files}
    select(run, 15)
    original = run.selected_as(None, "original.jsonl")
    got = open(original, "rb").read().splitlines()
    sel = pq.read_table(run.selection()).to_pylist()
    lines = {str(f): (gzip.open(f) if f.suffix == ".gz" else open(f, "rb")).read().split(b"\n") for f in files}
    assert len(got) == 15 and [lines[r["file"]][r["row"]] for r in sel] == got  # byte for byte, at file and line
    ids = [r["id"] for r in sel]
    assert [json.loads(g)["id"] for g in got] == ids and ids == [r["id"] for r in normalised_selection(run)]
    assert all(f"part-{'agn'.index(r['source'][0])}.jsonl" in r["file"] for r in sel)  # sorted by source
    assert {r["source"] for r in sel} == {"algebra", "geometry", "numbers"}  # every part, the gzipped one too
    trained = normalised_selection(run)
    assert any("\n" in r["prompt"] for r in trained)  # instruction and input, joined as LLaMA-Factory joins them

    info = json.loads(open(run.path("dataset_info.json")).read())
    entry = info["s2l_selected"]
    assert entry["formatting"] == "alpaca" and entry["file_name"] == "selected.original.jsonl"
    read = llamafactory_read(entry, [json.loads(g) for g in got])
    assert [{"prompt": r["prompt"], "response": r["response"]} for r in trained] == \
        [{"prompt": r["prompt"], "response": r["response"]} for r in read]
    assert {r["system"] for r in read} == {"You are careful."}

    (ax,) = yaml.safe_load(open(run.path("axolotl.yaml")))["datasets"]
    assert ax["path"] == run.uri_of("selected.original.jsonl") and ax["ds_type"] == "json"
    assert [{"text": r["text"], "response": r["response"]} for r in axolotl_read(ax, [json.loads(g) for g in got])] == \
        [{"text": TEMPLATE.format(prompt=r["prompt"]), "response": r["response"]} for r in trained]

    trl = pq.read_table(run.selected_as(None, "trl.parquet"))
    assert trl.column_names == ["prompt", "completion"]
    assert trl.to_pylist() == [{"prompt": r["prompt"], "completion": r["response"]} for r in trained]


def test_sharegpt_parquet_rows_keep_their_schema_and_read_back_as_the_trained_turns(ray_local, demo_small, tmp_path):
    write_sharegpt(tmp_path)
    run = stored_run(tmp_path, CorpusConfig(path=str(tmp_path)), demo_small["tokenizer"])
    select(run, 11)
    original = pq.read_table(run.selected_as(None, "original.parquet"))
    source = pa.concat_tables([pq.read_table(tmp_path / f"chat-{k}.parquet") for k in range(2)])
    assert [i["records"] for i in run.read_manifest()["corpus"]["inputs"]] == \
        [pq.read_metadata(tmp_path / f"chat-{k}.parquet").num_rows for k in range(2)]
    assert original.schema.equals(source.schema, check_metadata=False)
    sel = pq.read_table(run.selection()).to_pylist()
    by_file = {f"{tmp_path}/chat-{k}.parquet": pq.read_table(tmp_path / f"chat-{k}.parquet").to_pylist() for k in range(2)}
    assert original.to_pylist() == [by_file[r["file"]][r["row"]] for r in sel]

    trained = normalised_selection(run)
    turns = [{"messages": r["messages"]} for r in trained]
    entry = json.loads(open(run.path("dataset_info.json")).read())["s2l_selected"]
    assert entry["formatting"] == "sharegpt" and entry["tags"]["user_tag"] == "human"
    assert llamafactory_read(entry, original.to_pylist()) == turns
    (ax,) = yaml.safe_load(open(run.path("axolotl.yaml")))["datasets"]
    assert ax["type"] == "chat_template" and ax["ds_type"] == "parquet"
    assert axolotl_read(ax, original.to_pylist()) == turns
    trl = pq.read_table(run.selected_as(None, "trl.parquet"))
    assert trl.to_pylist() == turns


def test_a_datasets_directory_keeps_its_features(ray_local, demo_small, tmp_path):
    import datasets

    features = datasets.Features({"question": datasets.Value("string"), "answer": datasets.Value("string"),
                                  "level": datasets.ClassLabel(names=["easy", "hard"])})
    ds = datasets.Dataset.from_dict({"question": [f"What is {i} squared?" for i in range(30)],
                                     "answer": [f"#### {i * i}" for i in range(30)],
                                     "level": [i % 2 for i in range(30)]}, features=features)
    ds.save_to_disk(str(tmp_path / "ds"), num_shards=3)
    run = stored_run(tmp_path, CorpusConfig(path=str(tmp_path / "ds")), demo_small["tokenizer"])
    assert [i["records"] for i in run.read_manifest()["corpus"]["inputs"]] == [10, 10, 10]  # the 3 shards' rows
    select(run, 9)
    back = datasets.Dataset.from_parquet(run.selected_as(None, "original.parquet"))
    assert back.features == features
    picked = [json.loads(line)["prompt"] for line in open(run.selected_jsonl())]
    assert back["question"] == picked


def test_trl_trains_on_the_hand_off(ray_local, demo_small, smollm2_proxy, tmp_path):
    """A few steps of TRL's SFTTrainer on each TRL Parquet, with the 2-layer SmolLM2 (its own chat template)."""
    import datasets
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    for name, write in (("chat", write_sharegpt), ("alpaca", write_alpaca)):
        (tmp_path / name).mkdir()
        write(tmp_path / name)
    for name in ("chat", "alpaca"):
        run = stored_run(tmp_path / name, CorpusConfig(path=str(tmp_path / name)), smollm2_proxy)
        select(run, 8)
        data = datasets.Dataset.from_parquet(run.selected_as(None, "trl.parquet"))
        trainer = SFTTrainer(model=AutoModelForCausalLM.from_pretrained(smollm2_proxy),
                             processing_class=AutoTokenizer.from_pretrained(smollm2_proxy), train_dataset=data,
                             args=SFTConfig(output_dir=str(tmp_path / f"trl-{name}"), max_steps=3,
                                            per_device_train_batch_size=4, learning_rate=1e-4, report_to=[],
                                            use_cpu=True, save_strategy="no", logging_steps=1, max_length=128))
        result = trainer.train()
        assert result.global_step == 3 and np.isfinite(result.training_loss)


def test_a_json_array_file_comes_back_as_the_same_records(ray_local, demo_small, tmp_path):
    """One JSON array, as MathInstruct and Alpaca ship theirs: read whole, and the subset is the same records as an
    array (every field, the same values) that LLaMA-Factory reads as it read the input."""
    rows = alpaca_rows("algebra", 10) + alpaca_rows("geometry", 10)
    (tmp_path / "MathInstruct.json").write_text(json.dumps(rows, ensure_ascii=False, indent=2))
    run = stored_run(tmp_path, CorpusConfig(path=str(tmp_path / "MathInstruct.json")), demo_small["tokenizer"])
    assert run.read_manifest()["corpus"]["rows"] == 18  # the two rows with an empty output dropped
    select(run, 8)
    back = json.loads(open(run.selected_as(None, "original.json")).read())
    sel = pq.read_table(run.selection()).to_pylist()
    assert back == [rows[r["row"]] for r in sel] and [r["id"] for r in back] == [r["id"] for r in sel]
    entry = json.loads(open(run.dataset_info).read())["s2l_selected"]
    assert entry["file_name"] == "selected.original.json" and entry["formatting"] == "alpaca"
    trained = normalised_selection(run)
    assert [{"prompt": r["prompt"], "response": r["response"]} for r in llamafactory_read(entry, back)] == \
        [{"prompt": r["prompt"], "response": r["response"]} for r in trained]
