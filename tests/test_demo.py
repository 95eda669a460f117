"""The built-in demo corpus: deterministic, multi-source, evaluation split disjoint from training."""
from dataclasses import replace

from s2l_ray import demo
from s2l_ray.config import DemoConfig
from s2l_ray.models import load_tokenizer


def test_same_seed_same_corpus_and_disjoint_eval():
    cfg = DemoConfig(train_per_source=15, eval_per_source=5)
    train, ev, _, _ = demo.generate(cfg)
    assert demo.generate(cfg)[:2] == (train, ev)
    assert len({r["source"] for r in train}) >= 8 and "gsm_symbolic" in {r["source"] for r in train}
    assert not {r["prompt"] for r in train} & {r["prompt"] for r in ev}
    other = demo.generate(DemoConfig(train_per_source=15, eval_per_source=5, seed=cfg.seed + 99_999))[0]
    assert other != train
    gsm = next(r for r in train if r["source"] == "gsm_symbolic")
    assert gsm["response"].count("\n") >= 2 and gsm["response"].rstrip().endswith(f"#### {gsm['answer']}")
    assert all(r["response"].rstrip().endswith(f"#### {r['answer']}") for r in train)


def test_build_writes_a_tokenizer_that_reloads_from_its_dir(demo_small):
    tok = load_tokenizer(demo_small["tokenizer"])
    text = "What is 12 + 30?\n#### 42"
    assert tok.decode(tok(text)["input_ids"]) == text
    assert tok.eos_token_id is not None and tok.pad_token_id is not None and tok.pad_token_id != tok.eos_token_id


def test_skewed_mixture_sizes_per_source_and_bad_sizes_refused():
    from collections import Counter

    import pytest

    from s2l_ray.config import ConfigError

    cfg = DemoConfig(sources=["lcm", "chain_sum", "basic_arithmetic"], train_sizes=[3, 9, 27], eval_per_source=2)
    train, ev, _, _ = demo.generate(cfg)
    assert Counter(r["source"] for r in train) == {"lcm": 3, "chain_sum": 9, "basic_arithmetic": 27}
    assert Counter(r["source"] for r in ev) == {"lcm": 2, "chain_sum": 2, "basic_arithmetic": 2}
    for sizes in ([3, 9], [3, 0, 9]):
        with pytest.raises(ConfigError, match="demo.train_sizes: give one count >= 1 per source"):
            demo.generate(DemoConfig(sources=cfg.sources, train_sizes=sizes))


def test_generator_args_set_each_source_difficulty_in_the_demo_and_the_pretraining_texts(tmp_path):
    import re

    import pytest

    from s2l_ray.config import ConfigError, load_config

    yaml = tmp_path / "demo.yaml"
    yaml.write_text("sources: [gcd, basic_arithmetic]\ntrain_per_source: 30\neval_per_source: 5\n"
                    "generator_args:\n  basic_arithmetic: {max_terms: 2, max_digits: 1, operators: ['+'],"
                    " allow_parentheses: false, allow_negation: false}\n")
    cfg = load_config(str(yaml), cls=DemoConfig)
    train, ev, _, _ = demo.generate(cfg)
    easy = [r["prompt"] for r in train + ev if r["source"] == "basic_arithmetic"]
    assert easy and all(re.fullmatch(r"Calculate \d{1,2} \+ \d{1,2}\.", p) for p in easy)
    gcd = [int(n) for r in train if r["source"] == "gcd" for n in re.findall(r"\d+", r["prompt"].split(":")[1])]
    assert max(gcd) > 100  # unnamed sources keep reasoning-gym's defaults (values up to 1000)
    texts = demo.pretraining_rows(["basic_arithmetic"], 20, 50_000_000, cfg.generator_args)
    assert all(re.fullmatch(r"Calculate \d{1,2} \+ \d{1,2}\.", r["prompt"]) for r in texts)
    with pytest.raises(ConfigError, match=r"demo.generator_args: \['lcm'\] are not among demo.sources"):
        demo.generate(DemoConfig(sources=["gcd"], generator_args={"lcm": {"max_value": 20}}))
    with pytest.raises(ConfigError, match="demo.generator_args.gcd: reasoning-gym refused"):
        demo.generate(DemoConfig(sources=["gcd"], generator_args={"gcd": {"max_vaule": 20}}))
    yaml.write_text("generator_args: {gcd: 20}\n")
    with pytest.raises(ConfigError, match="generator_args: expected a mapping of mappings"):
        load_config(str(yaml), cls=DemoConfig)


def test_split_digits_gives_every_digit_its_own_token_and_round_trips(tmp_path):
    cfg = DemoConfig(sources=["basic_arithmetic", "gcd"], train_per_source=40, eval_per_source=2, vocab_size=400)
    merged = load_tokenizer(demo.build(cfg, str(tmp_path / "bpe"))["tokenizer"])
    split = load_tokenizer(demo.build(replace(cfg, split_digits=True),
                                      str(tmp_path / "digits"))["tokenizer"])
    text = "Calculate 76 - 18.\n#### 58, then 1024 and 3.25"
    assert split.decode(split(text)["input_ids"]) == text
    pieces = split.tokenize(text)
    assert [p.lstrip("Ġ") for p in pieces if any(c.isdigit() for c in p)] == list("7618581024325")
    assert any(sum(c.isdigit() for c in p) > 1 for p in merged.tokenize(text))  # the default BPE merges digits


def test_a_rebuild_that_gives_the_same_rows_leaves_the_files_untouched(tmp_path):
    import os

    cfg = DemoConfig(sources=["gcd", "lcm"], train_per_source=20, eval_per_source=3, vocab_size=300)
    paths = demo.build(cfg, str(tmp_path))
    files = [paths[k] for k in ("train", "train_chat", "eval", "eval_gsm8k")]
    before = {f: os.stat(f).st_mtime_ns for f in files}
    tok = os.path.join(paths["tokenizer"], "tokenizer.json")
    bpe = open(tok).read()
    demo.build(replace(cfg, split_digits=True), str(tmp_path))  # new tokenizer, same rows
    assert {f: os.stat(f).st_mtime_ns for f in files} == before and open(tok).read() != bpe
    demo.build(replace(cfg, train_per_source=21), str(tmp_path))
    changed = {f for f in files if os.stat(f).st_mtime_ns != before[f]}
    assert changed == {paths["train"], paths["train_chat"]}  # one more training row; the held-out rows as before


def test_target_examples_and_the_one_task_evaluation_come_from_far_seeds():
    import pytest

    from s2l_ray.config import ConfigError

    cfg = DemoConfig(sources=["gcd", "chain_sum"], train_per_source=10, eval_per_source=3, target_per_source=6,
                     target_eval_per_source=8)
    train, ev, target, target_eval = demo.generate(cfg)
    assert {r["source"] for r in target} == {r["source"] for r in target_eval} == {"gcd"}  # default: the first source
    assert len(target) == 6 and len(target_eval) == 8
    assert target_eval[:3] == [r for r in ev if r["source"] == "gcd"]  # the held-out items, and more of them
    prompts = [{r["prompt"] for r in rows} for rows in (train, ev + target_eval, target)]
    assert not prompts[0] & prompts[1] and not prompts[0] & prompts[2] and not prompts[1] & prompts[2]
    assert demo.generate(replace(cfg, target_sources=["chain_sum"]))[2][0]["source"] == "chain_sum"
    assert demo.generate(replace(cfg, target_per_source=0, target_eval_per_source=0))[2:] == ([], [])
    with pytest.raises(ConfigError, match=r"demo.target_sources: \['lcm'\] are not among"):
        demo.generate(replace(cfg, target_sources=["lcm"]))
    # a setting the generator accepts but fails on when an item is drawn is refused the same way
    with pytest.raises(ConfigError, match="demo.generator_args.simple_equations: reasoning-gym refused"):
        demo.generate(DemoConfig(sources=["simple_equations"], train_per_source=2, eval_per_source=1,
                                 generator_args={"simple_equations": {"operators": ["+", "-"]}}))
