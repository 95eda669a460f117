"""The built-in demo corpus: deterministic, multi-source, evaluation split disjoint from training."""
from s2l_ray import demo
from s2l_ray.config import DemoConfig
from s2l_ray.models import load_tokenizer


def test_same_seed_same_corpus_and_disjoint_eval():
    cfg = DemoConfig(train_per_source=15, eval_per_source=5)
    train, ev = demo.generate(cfg)
    assert demo.generate(cfg) == (train, ev)
    assert len({r["source"] for r in train}) >= 8 and "gsm_symbolic" in {r["source"] for r in train}
    assert not {r["prompt"] for r in train} & {r["prompt"] for r in ev}
    other, _ = demo.generate(DemoConfig(train_per_source=15, eval_per_source=5, seed=cfg.seed + 99_999))
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
    train, ev = demo.generate(cfg)
    assert Counter(r["source"] for r in train) == {"lcm": 3, "chain_sum": 9, "basic_arithmetic": 27}
    assert Counter(r["source"] for r in ev) == {"lcm": 2, "chain_sum": 2, "basic_arithmetic": 2}
    for sizes in ([3, 9], [3, 0, 9]):
        with pytest.raises(ConfigError, match="demo.train_sizes: give one count >= 1 per source"):
            demo.generate(DemoConfig(sources=cfg.sources, train_sizes=sizes))
