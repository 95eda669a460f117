"""Per-example loss against its definition: the model's loss on that example alone."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

from s2l_ray.models import load_tokenizer, preset_config
from s2l_ray.config import CorpusConfig, TextConfig
from s2l_ray.corpus import normalise
from s2l_ray.scoring import example_losses, reference_losses, score_rows
from s2l_ray.text import IGNORE_INDEX, collate, encode, group_by_length, labels_from, length_buckets

TEMPLATE = "Question: {prompt}\nAnswer: "


def tokenize_batch(tok, prompts, responses, template, max_length):
    enc = encode(tok, prompts, responses, [None] * len(prompts), template=template, chat=None, max_length=max_length)
    enc["labels"] = [labels_from(i, s) for i, s in zip(enc["input_ids"], enc["spans"])]
    return enc


@pytest.fixture(scope="module")
def tok(demo_small):
    return load_tokenizer(demo_small["tokenizer"])


@pytest.fixture(scope="module")
def model(tok):
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(preset_config("tiny", tok)).eval()


@pytest.fixture(scope="module")
def rows(demo_small):
    import json

    return [json.loads(line) for line in open(demo_small["train"])][:24]


def alone(model, ids, labels):
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids]), labels=torch.tensor([labels])).loss.item()


def test_batched_loss_equals_loss_alone_padded_or_not(model, tok, rows):
    enc = tokenize_batch(tok, [r["prompt"] for r in rows], [r["response"] for r in rows], TEMPLATE, 512)
    lengths = {len(x) for x in enc["input_ids"]}
    assert len(lengths) > 3, "rows must differ in length so that the batch is padded"
    b = collate(enc["input_ids"], enc["labels"], tok.pad_token_id)
    loss, conf, n = example_losses(model, b["input_ids"], b["labels"])
    expected = [alone(model, i, lab) for i, lab in zip(enc["input_ids"], enc["labels"])]
    np.testing.assert_allclose(loss.numpy(), expected, rtol=0, atol=1e-5)
    assert n.tolist() == enc["n_response"]
    # padding to a much longer width changes nothing
    wide = collate(enc["input_ids"], enc["labels"], tok.pad_token_id, pad_to=max(lengths) + 40)
    loss2, _, _ = example_losses(model, wide["input_ids"], wide["labels"])
    np.testing.assert_allclose(loss2.numpy(), expected, rtol=0, atol=1e-5)
    assert torch.all((conf > 0) & (conf < 1))


def test_only_response_tokens_count(model, tok, rows):
    r = rows[0]
    enc = tokenize_batch(tok, [r["prompt"]], [r["response"]], TEMPLATE, 512)
    ids, labels = enc["input_ids"][0], enc["labels"][0]
    n_prompt = len(ids) - enc["n_response"][0]
    assert labels[:n_prompt] == [IGNORE_INDEX] * n_prompt and labels[n_prompt:] == ids[n_prompt:]
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0]
    manual = F.cross_entropy(logits[n_prompt - 1:-1], torch.tensor(ids[n_prompt:])).item()
    b = collate([ids], [labels], tok.pad_token_id)
    loss, _, n = example_losses(model, b["input_ids"], b["labels"])
    assert loss.item() == pytest.approx(manual, abs=1e-5)
    assert n.item() == len(ids) - n_prompt
    # counting every token would give another value
    everything = F.cross_entropy(logits[:-1], torch.tensor(ids[1:])).item()
    assert abs(everything - manual) > 1e-3


def test_score_rows_buckets_keep_input_order(model, tok, rows):
    enc = tokenize_batch(tok, [r["prompt"] for r in rows], [r["response"] for r in rows], TEMPLATE, 512)
    out = score_rows(model, enc["input_ids"], enc["spans"], tok.pad_token_id, max_tokens=300, device=torch.device("cpu"))
    ref = reference_losses(model, tok, [normalise(r, CorpusConfig()) for r in rows], TextConfig(template=TEMPLATE))
    np.testing.assert_allclose(out["loss"], ref, rtol=0, atol=1e-5)
    assert labels_from([5, 6, 7, 8, 9], [2, 3, 4, 5]) == [IGNORE_INDEX, IGNORE_INDEX, 7, IGNORE_INDEX, 9]


def test_truncation_can_leave_no_response_token(tok):
    enc = tokenize_batch(tok, ["word " * 200], ["short answer"], TEMPLATE, 32)
    assert enc["n_response"] == [0] and enc["truncated"] == [True] and len(enc["input_ids"][0]) == 32


@pytest.mark.parametrize("lengths,max_tokens", [([5, 1, 9, 3, 3, 7, 2], 12), ([4] * 10, 8), ([50, 3], 10), ([], 8)])
def test_length_buckets(lengths, max_tokens):
    buckets = length_buckets(lengths, max_tokens)
    flat = sorted(int(i) for b in buckets for i in b)
    assert flat == list(range(len(lengths)))
    for b in buckets:
        assert len(b) == 1 or len(b) * max(lengths[i] for i in b) <= max_tokens


def test_group_by_length_hand_worked():
    # lengths 5 1 4 2 3 7 6, micro-batches of 3: sorted rows 1 3 4 2 0 6 5 -> [1 3 4] [2 0 6] [5], shuffled
    lengths = [5, 1, 4, 2, 3, 7, 6]
    chunks = group_by_length(lengths, 3, np.random.default_rng(0))
    order = np.random.default_rng(0).permutation(3)
    assert [c.tolist() for c in chunks] == [[[1, 3, 4], [2, 0, 6], [5]][j] for j in order]
    orders = {tuple(tuple(c.tolist()) for c in group_by_length(lengths, 3, np.random.default_rng(s))) for s in range(50)}
    assert len(orders) == 6  # every order of the three micro-batches occurs
    assert [c.tolist() for c in group_by_length([3, 1], 8, np.random.default_rng(0))] == [[1, 0]]


def test_collate_right_pads_ids_labels_and_mask():
    b = collate([[5, 6, 7], [8], []], [[-100, 6, 7], [8], []], pad_id=0, pad_to=4)
    assert b["input_ids"].tolist() == [[5, 6, 7, 0], [8, 0, 0, 0], [0, 0, 0, 0]]
    assert b["labels"].tolist() == [[-100, 6, 7, -100], [8, -100, -100, -100], [-100] * 4]
    assert b["attention_mask"].tolist() == [[1, 1, 1, 0], [1, 0, 0, 0], [0, 0, 0, 0]]
    assert b["input_ids"].dtype == torch.long and collate([[1, 2]], [[1, 2]], 0)["input_ids"].shape == (1, 2)
