"""``text.encode`` against the tokenizers' own definitions: the real SmolLM2 tokenizer and chat template,
a tokenizer that adds BOS, and the demo's BPE."""
from __future__ import annotations

import pytest
from tokenizers import processors

from s2l_ray.config import CorpusConfig
from s2l_ray.corpus import normalise
from s2l_ray.models import load_tokenizer
from s2l_ray.text import (
    PLAIN_CHAT_TEMPLATE,
    TextError,
    chat_template,
    encode,
    labels_from,
    prompt_ids,
    stop_prefix,
)

TEMPLATE = "Question: {prompt}\nAnswer: "
CHAT = [{"role": "system", "content": "You solve maths problems."},
        {"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "2+2 = 4.\n#### 4"},
        {"role": "user", "content": "And 3*3?"}, {"role": "assistant", "content": "It is 9.\n#### 9"}]


@pytest.fixture(scope="module")
def smol(smollm2):
    return load_tokenizer(smollm2)


@pytest.fixture(scope="module")
def demo_tok(demo_small):
    return load_tokenizer(demo_small["tokenizer"])


@pytest.fixture(scope="module")
def bos_tok(demo_small):
    """The demo tokenizer with a post-processor that adds BOS, as Llama's and Mistral's do."""
    tok = load_tokenizer(demo_small["tokenizer"])
    tok.add_special_tokens({"bos_token": "<s>"})
    tok._tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", tok.convert_tokens_to_ids("<s>"))])
    assert tok("x")["input_ids"][0] == tok.bos_token_id
    return tok


def plain(tok, prompts, responses, max_length=512):
    return encode(tok, prompts, responses, [None] * len(prompts), template=TEMPLATE, chat=None,
                  max_length=max_length)


def labelled(ids, spans):
    return [t for t, lab in zip(ids, labels_from(ids, spans)) if lab != -100]


@pytest.mark.parametrize("which", ["smol", "demo_tok", "bos_tok"])
def test_plain_rows_are_the_whole_example_tokenised_once(which, request):
    tok = request.getfixturevalue(which)
    prompts, responses = ["What is 12 + 30?", "Simplify 6/8."], ["12 + 30 = 42\n#### 42", "#### 3/4"]
    enc = plain(tok, prompts, responses)
    for p, r, ids, spans in zip(prompts, responses, enc["input_ids"], enc["spans"]):
        whole = tok(TEMPLATE.format(prompt=p) + r)["input_ids"]  # the tokenizer's own special-token policy
        assert ids == whole + [tok.eos_token_id]
        assert spans == [spans[0], len(ids)] and len(spans) == 2
        assert tok.decode(labelled(ids, spans)).strip() == r + tok.eos_token  # the response and EOS, nothing else
        assert "Answer" in tok.decode(ids[:spans[0]]) and r[:2] not in tok.decode(ids[:spans[0]])[-4:]
        assert prompt_ids(ids, spans) == ids[:spans[0]]
    if which == "bos_tok":
        assert all(ids[0] == tok.bos_token_id for ids in enc["input_ids"])
    else:
        assert all(ids[0] != tok.bos_token_id or tok.bos_token_id == tok.eos_token_id for ids in enc["input_ids"])


def test_no_lone_space_token_before_the_response(demo_tok):
    """The template ends in a space: tokenised separately it would be a token of its own."""
    enc = plain(demo_tok, ["What is 2+2?"], ["4"])
    ids, spans = enc["input_ids"][0], enc["spans"][0]
    assert demo_tok.convert_ids_to_tokens(ids[spans[0]]) == "Ġ4"  # the space merged into the answer, as pretrained
    assert demo_tok.decode(ids[spans[0] - 1:spans[0]]) == ":"  # the prompt ends at "Answer:"
    separate = demo_tok(TEMPLATE.format(prompt="What is 2+2?"), add_special_tokens=False)["input_ids"]
    assert demo_tok.decode(separate[-1:]) == " "  # what tokenising the prompt alone gave


def test_chat_rows_are_the_chat_templates_rendering_with_every_assistant_turn_labelled(smol):
    enc = encode(smol, [""], [""], [CHAT], template=TEMPLATE, chat=chat_template(smol, ""), max_length=1024)
    ids, spans = enc["input_ids"][0], enc["spans"][0]
    assert ids == smol.apply_chat_template(CHAT, tokenize=True, return_dict=False)
    assert len(spans) == 4  # two assistant turns
    turns = [smol.decode(ids[s:e]) for s, e in zip(spans[::2], spans[1::2])]
    assert turns == ["2+2 = 4.\n#### 4<|im_end|>", "It is 9.\n#### 9<|im_end|>"]
    assert enc["n_response"] == [sum(e - s for s, e in zip(spans[::2], spans[1::2]))]
    head = smol.apply_chat_template(CHAT[:-1], tokenize=True, return_dict=False, add_generation_prompt=True)
    assert prompt_ids(ids, spans) == head
    # nothing outside the assistant turns is labelled: the system prompt, the questions, the role headers
    outside = smol.decode([t for t, lab in zip(ids, labels_from(ids, spans)) if lab == -100])
    assert "What is 2+2?" in outside and "You solve" in outside and "#### 4" not in outside


def test_sharegpt_conversations_read_as_messages(smol):
    share = {"conversations": [{"from": {"system": "system", "user": "human", "assistant": "gpt"}[m["role"]],
                                "value": m["content"]} for m in CHAT]}
    a, b = normalise({"messages": CHAT}, CorpusConfig()), normalise(share, CorpusConfig())
    assert a["messages"] == b["messages"] and a["prompt"] == "And 3*3?" and a["response"] == CHAT[-1]["content"]


def test_truncation_clips_spans_and_can_leave_none(smol):
    enc = encode(smol, ["word " * 300, "x"], ["short answer", "y"], [None, None], template=TEMPLATE, chat=None,
                 max_length=32)
    assert enc["n_response"][0] == 0 and enc["truncated"][0] and len(enc["input_ids"][0]) == 32
    assert enc["spans"][0] == []
    chat = encode(smol, [""], [""], [CHAT], template=TEMPLATE, chat=chat_template(smol, ""), max_length=60)
    spans = chat["spans"][0]
    assert spans[-1] <= 60 and chat["truncated"] == [True]


def test_a_chat_row_without_a_chat_template(demo_tok):
    with pytest.raises(TextError, match="no chat template.*text.chat_template"):
        encode(demo_tok, [""], [""], [CHAT], template=TEMPLATE, chat=None, max_length=512)
    enc = encode(demo_tok, [""], [""], [CHAT], template=TEMPLATE, chat=PLAIN_CHAT_TEMPLATE, max_length=512)
    text = demo_tok.decode(enc["input_ids"][0])
    assert text.startswith("You solve maths problems.\nQuestion: What is 2+2?\nAnswer: 2+2 = 4.")
    assert [demo_tok.decode(labelled(enc["input_ids"][0], enc["spans"][0][i:i + 2])).strip()
            for i in (0, 2)] == ["2+2 = 4.\n#### 4" + demo_tok.eos_token, "It is 9.\n#### 9" + demo_tok.eos_token]
    assert chat_template(demo_tok, "plain") == PLAIN_CHAT_TEMPLATE and stop_prefix(TEMPLATE) == "Question:"


def test_a_template_that_rewrites_earlier_turns_is_refused(smol):
    rewrites = ("{% for m in messages %}{% if loop.last %}{{ m['role'] + ': ' + m['content'] + '\n' }}"
                "{% else %}{{ m['role'][0] + '\n' }}{% endif %}{% endfor %}"
                "{% if add_generation_prompt %}assistant: {% endif %}")
    with pytest.raises(TextError, match="renders the turns before assistant turn"):
        encode(smol, [""], [""], [CHAT], template=TEMPLATE, chat=rewrites, max_length=512, where=["f.jsonl:3"])


def test_train_on_prompt_labels_every_token_after_the_first(demo_tok, smol):
    for tok, conv in ((demo_tok, None), (smol, CHAT)):
        enc = encode(tok, ["What is 2+2?"], ["4"], [conv], template=TEMPLATE, chat=chat_template(smol, ""),
                     max_length=512, train_on_prompt=True)
        ids = enc["input_ids"][0]
        assert enc["spans"] == [[1, len(ids)]] and enc["n_response"] == [len(ids) - 1]


def _loss_and_grads(model, batch):
    model.zero_grad()
    loss = model(**batch, use_cache=False).loss
    loss.backward()
    return loss.item(), [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize("model_name", ["gpt-neox", "smollm2"])
def test_packed_rows_give_the_padded_loss_and_gradients(model_name, demo_small, smollm2_proxy, demo_tok, smol):
    """A packed micro-batch (no padding, attention confined to each row by position_ids) has the padded batch's
    loss and gradients (fp32, 1e-5): GPT-NeoX (the demo proxy) on the demo's rows, and the real SmolLM2 (Llama, cut
    to 2 layers) on chat rows whose every assistant turn is labelled, with a plain row between them."""
    import json

    from s2l_ray.models import build_model, load_model
    from s2l_ray.text import pack, training_batch

    if model_name == "gpt-neox":
        tok, model = demo_tok, build_model("tiny", demo_tok, 0, 256)
        rows = [normalise(json.loads(line), CorpusConfig()) for line in open(demo_small["train"])][:6]
        enc = encode(tok, [r["prompt"] for r in rows], [r["response"] for r in rows], [None] * len(rows),
                     template=TEMPLATE, chat=None, max_length=256)
    else:
        tok, model = smol, load_model(smollm2_proxy)
        chats = [CHAT, CHAT[1:3], CHAT[:1] + CHAT[3:]]
        enc = encode(tok, ["", "What is 5-1?", ""], ["", "4", ""], [chats[0], None, chats[2]],
                     template=TEMPLATE, chat=chat_template(tok, ""), max_length=256)
        assert len(enc["spans"][0]) == 4  # two labelled assistant turns
    model.float().train()
    ids, spans = enc["input_ids"], enc["spans"]
    packed = training_batch(ids, spans, tok.pad_token_id or 0, packed=True)
    assert packed["input_ids"].shape == (1, sum(map(len, ids)))  # every token real
    assert packed["position_ids"][0, :len(ids[0]) + 1].tolist() == list(range(len(ids[0]))) + [0]
    loss_pad, grads_pad = _loss_and_grads(model, training_batch(ids, spans, tok.pad_token_id or 0, packed=False))
    loss_pack, grads_pack = _loss_and_grads(model, packed)
    assert abs(loss_pad - loss_pack) < 1e-5
    assert max((a - b).abs().max().item() for a, b in zip(grads_pad, grads_pack)) < 1e-5
    # the same rows packed in another order: the same loss (no row sees another)
    assert abs(_loss_and_grads(model, pack(ids[::-1], [labels_from(x, s) for x, s in zip(ids[::-1], spans[::-1])]))[0]
               - loss_pad) < 1e-5
