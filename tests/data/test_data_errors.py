"""Bad input is loud: each case names file:line (or row) and the reason; skip mode counts them."""

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from jaxft.data import DataError, DataPipeline

GOOD = {"messages": [{"role": "user", "content": "Hi there"},
                                          {"role": "assistant", "content": "Hello!"}]}

# (reason key, raw JSONL line, what the message must say)
BAD_ROWS = [
        ("malformed_json", '{"messages": [{"role": "user", "content": "Hi"}', r"malformed JSON"),
        ("malformed_json", '["not", "an", "object"]', r"expected a JSON object per line, got list"),
        ("missing_field", '{"conversation": []}', r"missing field 'messages' \(data.messages_field\)"),
        ("missing_field", '{"messages": [{"role": "user"}]}', r"messages\[0\] has no 'content'"),
        ("unknown_role", '{"messages": [{"role": "user", "content": "Hi"}, '
                                          '{"role": "robot", "content": "Beep"}]}',
          r"messages\[1\].role is 'robot', not one of system, user, assistant, tool"),
        ("empty_content", '{"messages": [{"role": "user", "content": "   "}, '
                                            '{"role": "assistant", "content": "Hello"}]}', r"messages\[0\].content is empty"),
        ("empty_content", '{"messages": []}', r"field 'messages' has no messages"),
        ("bad_type", '{"messages": [{"role": "user", "content": 42}, '
                                  '{"role": "assistant", "content": "Hello"}]}',
          r"messages\[0\].content must be a string, got int"),
        ("bad_type", '{"messages": "Hi there"}', r"field 'messages' must be a list of messages"),
        ("empty_loss_mask", '{"messages": [{"role": "system", "content": "Be nice."}, '
                                                '{"role": "user", "content": "Hi"}]}',
          r"loss mask is empty: no assistant turn to train on"),
]


@pytest.mark.parametrize("reason,line,message", BAD_ROWS, ids=[f"{r}-{i}" for i, (r, _, _) in
                                                                                                                                enumerate(BAD_ROWS)])
def test_bad_row_raises_with_file_line_and_reason(tmp_path, write_jsonl, make_config,
                                                                                                    chatml_tokenizer, reason, line, message):
    # Line 2 is blank (not a row, but it still counts for line numbers); the bad row is line 3.
    path = write_jsonl(tmp_path / "bad.jsonl", [GOOD, "", line, GOOD])
    with pytest.raises(DataError, match=rf"bad\.jsonl:3: {message}.*\[{reason}\].*on_error='skip'"):
        DataPipeline(make_config(train=path, format="chat"), chatml_tokenizer)


def test_skip_mode_counts_every_reason(tmp_path, write_jsonl, make_config, chatml_tokenizer):
    lines = [GOOD]
    for _, line, _ in BAD_ROWS:
        lines += [line, GOOD]
    path = write_jsonl(tmp_path / "mixed.jsonl", lines)
    pipeline = DataPipeline(make_config(train=path, format="chat", on_error="skip"), chatml_tokenizer)
    report = pipeline.train_report
    expected = {}
    for reason, _, _ in BAD_ROWS:
        expected[reason] = expected.get(reason, 0) + 1
    assert dict(report.skipped) == expected
    assert report.rows == len(lines) and report.examples == len(BAD_ROWS) + 1
    # The summary points at real rows: the first malformed line is line 2.
    assert "mixed.jsonl:2: malformed JSON" in report.summary()


@pytest.mark.parametrize("fmt,row,message", [
        ("text", {"txt": "hello"}, r"missing field 'text' \(data.text_field\)"),
        ("text", {"text": ""}, r"field 'text' is empty"),
        ("text", {"text": ["a", "b"]}, r"field 'text' must be a string, got list"),
        ("prompt_completion", {"prompt": "Hi"}, r"missing field 'completion'"),
        ("prompt_completion", {"prompt": 3, "completion": "x"}, r"field 'prompt' must be a string"),
        ("prompt_completion", {"prompt": "Hi", "completion": ""}, r"field 'completion' is empty"),
])
def test_text_and_prompt_completion_errors(tmp_path, write_jsonl, make_config, chatml_tokenizer,
                                                                                      fmt, row, message):
    good = {"text": "Hello there"} if fmt == "text" else {"prompt": "Hi", "completion": " there"}
    path = write_jsonl(tmp_path / "rows.jsonl", [good, good, row])
    with pytest.raises(DataError, match=rf"rows\.jsonl:3: {message}"):
        DataPipeline(make_config(train=path, format=fmt), chatml_tokenizer)


def test_parquet_errors_name_file_and_row(tmp_path, make_config, chatml_tokenizer):
    path = str(tmp_path / "rows.parquet")
    pq.write_table(pa.table({"text": ["Hello there", None, "Bye"]}), path)
    with pytest.raises(DataError, match=r"rows\.parquet row 1: missing field 'text'"):
        DataPipeline(make_config(train=path, format="text"), chatml_tokenizer)
    pipeline = DataPipeline(make_config(train=path, format="text", on_error="skip"), chatml_tokenizer)
    assert dict(pipeline.train_report.skipped) == {"missing_field": 1}


def test_empty_dataset_after_filtering_is_an_error(tmp_path, write_jsonl, make_config,
                                                                                                      chatml_tokenizer):
    path = write_jsonl(tmp_path / "all_bad.jsonl", ['{"oops"', '{"text": ""}'])
    with pytest.raises(DataError, match=r"no training examples left.*2 rows -> 0 examples.*"
                                                                            r"empty_content=1, malformed_json=1"):
        DataPipeline(make_config(train=path, format="text", on_error="skip"), chatml_tokenizer)


def test_empty_validation_after_filtering_is_an_error(tmp_path, write_jsonl, make_config,
                                                                                                            chatml_tokenizer):
    train = write_jsonl(tmp_path / "train.jsonl", [{"text": "Hello there"}])
    val = write_jsonl(tmp_path / "val.jsonl", [{"text": ""}])
    with pytest.raises(DataError, match=r"validation: no examples left"):
        DataPipeline(make_config(train=train, validation=val, format="text", on_error="skip"),
                                  chatml_tokenizer)


@pytest.mark.parametrize("data,train,message", [
        ({"trian": "x.jsonl"}, {}, r"unknown config key\(s\) data.trian"),
        ({"format": "chatml"}, {}, r"data.format must be one of .*got 'chatml'"),
        ({"seq_len": 0}, {}, r"data.seq_len must be an int >= 2, got 0"),
        ({"on_error": "ignore"}, {}, r"data.on_error must be 'raise' or 'skip'"),
        ({"overlong": "wrap"}, {}, r"data.overlong must be 'truncate' or 'drop'"),
        ({"train": None}, {}, r"data.train is not set"),
        ({"train": "data.csv"}, {}, r"data.train: cannot tell the format of 'data.csv'"),
        ({"train": "missing/*.jsonl"}, {}, r"data.train: no files match 'missing/\*.jsonl'"),
        ({"weights": [1.0, 2.0]}, {}, r"data.weights must be a list of 1 weights"),
        ({"process_count": 3}, {"batch_size": 4}, r"train.batch_size=4 must be divisible by .* \(3\)"),
        ({}, {"batch_size": 0}, r"train.batch_size must be an int >= 1"),
        ({"stages": [{"train": "a.jsonl"}, {"train": "b.jsonl"}], "train": None}, {},
          r"data.stages\[0\]: only the last stage may run forever"),
        ({"stages": [{"train": "x.jsonl"}], "train": None, "epochs": 2}, {},
          r"data.stages replaces data.train, data.weights and data.epochs"),
        ({"train": [{"path": "x.jsonl", "weight": 1.0}, {"path": "x.jsonl"}]}, {},
          r"data.train: either every source has a weight or none does"),
])
def test_config_errors_name_the_key(tmp_path, write_jsonl, make_config, chatml_tokenizer,
                                                                        monkeypatch, data, train, message):
    monkeypatch.chdir(tmp_path)
    write_jsonl(tmp_path / "x.jsonl", [{"text": "Hello"}])
    config = make_config(**{"train": "x.jsonl", "format": "text", **data})
    for key, value in train.items():
        config.train[key] = value
    with pytest.raises(DataError, match=message):
        DataPipeline(config, chatml_tokenizer)


def test_chat_without_template_is_a_config_error(tmp_path, write_jsonl, make_config,
                                                                                                  chatml_tokenizer):
    path = write_jsonl(tmp_path / "c.jsonl", [GOOD])
    bare = chatml_tokenizer.__class__(tokenizer_object=chatml_tokenizer.backend_tokenizer,
                                                                        eos_token="<|im_end|>")
    with pytest.raises(DataError, match=r"needs a chat template.*data.chat_template"):
        DataPipeline(make_config(train=path, format="chat"), bare)
