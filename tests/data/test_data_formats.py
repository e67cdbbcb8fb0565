"""Exact loss masks: prompt/completion, multi-turn chat with stock-style templates, EOS trained.

The expected tokens and masks are built independently of the pipeline: each piece of text is
tokenized on its own with a known trained/untrained label and the pieces are concatenated (the
test first checks that this equals tokenizing the whole string, so the oracle is sound).
"""

import numpy as np
import pytest

from jaxft.data import DataError, DataPipeline

CONVERSATION = [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Hi there"},
        {"role": "assistant", "content": "Hello! How can I help?"},
        {"role": "user", "content": "What is two plus two?"},
        {"role": "assistant", "content": "Four. "},  # trailing space: Llama-3's template trims it
]

# (text, trained) pieces that each template renders CONVERSATION into.
CHATML_PIECES = [
        ("<|im_start|>system\nYou are terse.<|im_end|>\n<|im_start|>user\nHi there<|im_end|>\n"
          "<|im_start|>assistant\n", False),
        ("Hello! How can I help?<|im_end|>\n", True),
        ("<|im_start|>user\nWhat is two plus two?<|im_end|>\n<|im_start|>assistant\n", False),
        ("Four. <|im_end|>\n", True),
]
LLAMA3_PIECES = [
        ("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nYou are terse.<|eot_id|>"
          "<|start_header_id|>user<|end_header_id|>\n\nHi there<|eot_id|>"
          "<|start_header_id|>assistant<|end_header_id|>\n\n", False),
        ("Hello! How can I help?<|eot_id|>", True),
        ("<|start_header_id|>user<|end_header_id|>\n\nWhat is two plus two?<|eot_id|>"
          "<|start_header_id|>assistant<|end_header_id|>\n\n", False),
        ("Four.<|eot_id|>", True),
]


def expected_from_pieces(tokenizer, pieces):
    """(tokens, per-token trained mask) by tokenizing each piece alone."""
    tokens, mask = [], []
    for text, trained in pieces:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        tokens += ids
        mask += [trained] * len(ids)
    whole = tokenizer("".join(t for t, _ in pieces), add_special_tokens=False)["input_ids"]
    assert whole == tokens, "oracle unsound: pieces tokenize differently from the whole"
    return np.array(tokens), np.array(mask)


def only_example(tmp_path, write_jsonl, make_config, tokenizer, rows, **data):
    """The single document of `rows`, unpacked: (input_ids, targets, loss_mask) without padding."""
    path = write_jsonl(tmp_path / "rows.jsonl", rows)
    data = {"format": "chat", "seq_len": 128, "packing": False, "shuffle": False, **data}
    pipeline = DataPipeline(make_config(train=path, batch_size=1, **data), tokenizer)
    batch = next(pipeline.train_iterator())
    n = int(batch["attention_mask"][0].sum())
    assert (batch["segment_ids"][0, :n] == 1).all() and (batch["positions"][0, :n] == np.arange(n)).all()
    return batch["input_ids"][0, :n], batch["targets"][0, :n], batch["loss_mask"][0, :n], pipeline


def trained_runs(tokenizer, targets, loss_mask):
    """Decoded text of each contiguous run of trained targets."""
    runs, current = [], []
    for target, trained in zip(targets, loss_mask):
        if trained:
            current.append(int(target))
        elif current:
            runs.append(tokenizer.decode(current))
            current = []
    if current:
        runs.append(tokenizer.decode(current))
    return runs


@pytest.mark.parametrize("style,pieces,eos", [
        ("chatml", CHATML_PIECES, "<|im_end|>"), ("llama3", LLAMA3_PIECES, "<|eot_id|>")])
def test_multi_turn_chat_mask_is_exact_with_stock_templates(
        tmp_path, write_jsonl, make_config, make_tokenizer, style, pieces, eos):
    tokenizer = make_tokenizer(style)
    tokens, mask = expected_from_pieces(tokenizer, pieces)
    input_ids, targets, loss_mask, _ = only_example(
            tmp_path, write_jsonl, make_config, tokenizer, [{"messages": CONVERSATION}])

    np.testing.assert_array_equal(input_ids, tokens[:-1])
    np.testing.assert_array_equal(targets, tokens[1:])
    np.testing.assert_array_equal(loss_mask, mask[1:].astype(np.float32))
    assert trained_runs(tokenizer, targets, loss_mask) == [t for t, trained in pieces if trained]
    # The end-of-turn token (the tokenizer's EOS) is a target, so the model learns to stop.
    eos_id = tokenizer.convert_tokens_to_ids(eos)
    assert tokenizer.eos_token_id == eos_id
    assert (targets[loss_mask > 0] == eos_id).sum() == 2  # one per assistant turn


def test_train_on_last_assistant_only(tmp_path, write_jsonl, make_config, chatml_tokenizer):
    _, targets, loss_mask, _ = only_example(tmp_path, write_jsonl, make_config, chatml_tokenizer,
                                                                                    [{"messages": CONVERSATION}], train_on="last_assistant")
    assert trained_runs(chatml_tokenizer, targets, loss_mask) == ["Four. <|im_end|>\n"]


def test_prompt_completion_mask_is_exact_and_eos_is_a_target(
        tmp_path, write_jsonl, make_config, llama3_tokenizer):
    tok = llama3_tokenizer
    prompt, completion = "What is the capital of France?", " Paris."
    prompt_ids = tok(prompt, add_special_tokens=False)["input_ids"]
    completion_ids = tok(completion, add_special_tokens=False)["input_ids"]
    assert tok(prompt + completion, add_special_tokens=False)["input_ids"] == prompt_ids + completion_ids
    input_ids, targets, loss_mask, _ = only_example(
            tmp_path, write_jsonl, make_config, tok, [{"prompt": prompt, "completion": completion}],
            format="prompt_completion")
    # This tokenizer adds BOS itself, so the pipeline does too; EOS is appended and trained.
    tokens = [tok.bos_token_id, *prompt_ids, *completion_ids, tok.eos_token_id]
    np.testing.assert_array_equal(input_ids, tokens[:-1])
    np.testing.assert_array_equal(targets, tokens[1:])
    np.testing.assert_array_equal(loss_mask, [0.0] * len(prompt_ids) + [1.0] * (len(completion_ids) + 1))


def test_prompt_completion_without_bos_and_custom_field_names(
        tmp_path, write_jsonl, make_config, chatml_tokenizer):
    tok = chatml_tokenizer
    input_ids, targets, loss_mask, _ = only_example(
            tmp_path, write_jsonl, make_config, tok, [{"question": "Hi there", "answer": " Hello!"}],
            format="prompt_completion", prompt_field="question", completion_field="answer")
    prompt_ids = tok("Hi there", add_special_tokens=False)["input_ids"]
    assert tok.bos_token_id is None and input_ids[0] == prompt_ids[0]
    assert trained_runs(tok, targets, loss_mask) == [" Hello!<|im_end|>"]
    assert loss_mask[:len(prompt_ids) - 1].sum() == 0


def test_text_trains_every_token_and_the_eos(tmp_path, write_jsonl, make_config, llama3_tokenizer):
    tok = llama3_tokenizer
    text = "The quick brown fox jumps over the lazy dog."
    input_ids, targets, loss_mask, _ = only_example(
            tmp_path, write_jsonl, make_config, tok, [{"body": text}], format="text", text_field="body")
    tokens = [tok.bos_token_id, *tok(text, add_special_tokens=False)["input_ids"], tok.eos_token_id]
    np.testing.assert_array_equal(input_ids, tokens[:-1])
    np.testing.assert_array_equal(targets, tokens[1:])
    assert (loss_mask == 1).all()


def test_chat_over_long_drops_oldest_turns_and_keeps_system(
        tmp_path, write_jsonl, make_config, chatml_tokenizer):
    tok = chatml_tokenizer
    turns = [{"role": "system", "content": "You are terse."}]
    for i in range(4):
        turns += [{"role": "user", "content": f"Tell me a joke about cats and dogs {i}"},
                            {"role": "assistant", "content": f"Cats sleep all day long {i}"}]
    kept = [turns[0], *turns[-2:]]
    kept_tokens = tok.apply_chat_template(kept, return_dict=False)
    two_turns = tok.apply_chat_template([turns[0], *turns[-4:]], return_dict=False)
    seq_len = len(kept_tokens) + 3  # room for the last turn, not for the last two
    assert len(two_turns) - 1 > seq_len
    input_ids, targets, loss_mask, pipeline = only_example(
            tmp_path, write_jsonl, make_config, tok, [{"messages": turns}], seq_len=seq_len)
    np.testing.assert_array_equal(input_ids, kept_tokens[:-1])
    assert trained_runs(tok, targets, loss_mask) == ["Cats sleep all day long 3<|im_end|>\n"]
    assert pipeline.train_report.truncated == 1


@pytest.mark.parametrize("fmt,row", [
        ("chat", {"messages": [{"role": "user", "content": "Tell me a joke about cats " * 8},
                                                      {"role": "assistant", "content": "Cats sleep all day long."}]}),
        ("prompt_completion", {"prompt": "Tell me a joke about cats " * 8, "completion": " Cats."}),
])
def test_over_long_prompt_leaves_empty_mask_which_is_an_error(
        tmp_path, write_jsonl, make_config, chatml_tokenizer, fmt, row):
    path = write_jsonl(tmp_path / "long.jsonl", [row])
    with pytest.raises(DataError, match=r"long\.jsonl:1: loss mask is empty.*after truncating"):
        DataPipeline(make_config(train=path, format=fmt, seq_len=16), chatml_tokenizer)


def test_over_long_rows_dropped_and_counted(tmp_path, write_jsonl, make_config, chatml_tokenizer):
    rows = [{"text": "short text"}, {"text": "Tell me a joke about cats " * 20}, {"text": "Hello"}]
    path = write_jsonl(tmp_path / "t.jsonl", rows)
    pipeline = DataPipeline(make_config(train=path, format="text", seq_len=16, overlong="drop"),
                                                    chatml_tokenizer)
    assert pipeline.train_report.dropped_overlong == 1
    assert pipeline.train_report.examples == 2


def test_text_truncates_to_seq_len(tmp_path, write_jsonl, make_config, chatml_tokenizer):
    input_ids, targets, loss_mask, pipeline = only_example(
            tmp_path, write_jsonl, make_config, chatml_tokenizer,
            [{"text": "Tell me a joke about cats " * 20}], format="text", seq_len=16)
    assert len(input_ids) == 16 and loss_mask.sum() == 16
    assert pipeline.train_report.truncated == 1


# A Qwen3-like template: only the final assistant turn gets an (empty) think block, so earlier
# turns render differently inside the whole conversation than as its last message.
THINKING_TEMPLATE = (
        "{% for message in messages %}"
        "{% if message['role'] == 'assistant' and loop.last %}"
        "{{ '<|im_start|>assistant\n<think>\n\n</think>\n\n' + message['content'] + '<|im_end|>\n' }}"
        "{% else %}"
        "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
        "{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def test_template_that_rewrites_earlier_turns_is_refused_loudly_or_trained_on_last(
        tmp_path, write_jsonl, make_config, chatml_tokenizer):
    path = write_jsonl(tmp_path / "c.jsonl", [{"messages": CONVERSATION}])
    config = make_config(train=path, format="chat", chat_template=THINKING_TEMPLATE)
    with pytest.raises(DataError, match=r"c\.jsonl:1: chat template is not prefix-stable.*"
                                                                            r"train_on='last_assistant'"):
        DataPipeline(config, chatml_tokenizer)
    _, targets, loss_mask, _ = only_example(
            tmp_path, write_jsonl, make_config, chatml_tokenizer, [{"messages": CONVERSATION}],
            chat_template=THINKING_TEMPLATE, train_on="last_assistant")
    assert trained_runs(chatml_tokenizer, targets, loss_mask) == [
            "<think>\n\n</think>\n\nFour. <|im_end|>\n"]


def test_template_exception_names_the_row(tmp_path, write_jsonl, make_config, chatml_tokenizer):
    no_system = ("{% for m in messages %}{% if m['role'] == 'system' %}"
                              "{{ raise_exception('System role not supported') }}{% endif %}"
                              "{{ m['role'] + ': ' + m['content'] + '\n' }}{% endfor %}")
    ok = {"messages": CONVERSATION[1:3]}
    path = write_jsonl(tmp_path / "g.jsonl", [ok, {"messages": CONVERSATION}])
    with pytest.raises(DataError, match=r"g\.jsonl:2: chat template failed.*System role not supported"):
        DataPipeline(make_config(train=path, format="chat", chat_template=no_system), chatml_tokenizer)
