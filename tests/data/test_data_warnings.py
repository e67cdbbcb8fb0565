"""Data warnings: trained targets that are the unknown token, prompt/completion boundaries inside a
token (counted, warned once per source with file:line, and written to report.json); whitespace-only
JSONL lines skipped silently; a `.json` file holding one JSON array read as rows."""

import gzip
import json
import logging
import os
import shutil

import numpy as np
import pytest

from jaxft.data import DataError, DataPipeline

UNKNOWN = "unknown_target_tokens"
BOUNDARY = "boundary_inside_token"
HINT = ("a missing space between prompt and completion is the usual cause; the model then learns tokens it "
        "never sees at inference")
WORDS = ("Q : Where does Ann live ? A The answer is Paris Redwater nurse a brown tortoise What job "
         "hello there the dog runs fast").split()


def wordlevel_tokenizer(unk="[UNK]", eos="</s>"):
    """Whole words, no byte fallback: any other word is `unk` (which may be the EOS, as in GPT-2)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(dict.fromkeys(["<pad>", unk, eos, *WORDS]))}
    backend = Tokenizer(models.WordLevel(vocab, unk_token=unk))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token=unk, eos_token=eos, pad_token="<pad>")


def data_logs(caplog):
    return [r.getMessage() for r in caplog.records if r.name == "jaxft.data" and r.levelno >= logging.WARNING]


# ---- unknown target tokens -------------------------------------------------------------------------

def test_unknown_target_tokens_are_counted_and_warned_with_file_line_and_snippet(tmp_path, write_jsonl, make_config,
                                                                                 caplog):
    tokenizer = wordlevel_tokenizer()
    path = write_jsonl(tmp_path / "unk.jsonl", [
            {"prompt": "Q : Where does Ann live ?\nA :", "completion": " Paris"},              # clean
            "",
            {"prompt": "Q : Where does Ann live ?\nA :", "completion": " Zorblax Redwater"},   # 1 unknown, line 3
            {"prompt": "Q : Where does Xyzzy live ?\nA :", "completion": " Paris"},            # unknown in the prompt only
            {"prompt": "Q : What job ?\nA :", "completion": " Glorp nurse Frobnitz"},          # 2 unknown
    ])
    with caplog.at_level(logging.INFO, logger="jaxft.data"):
        pipeline = DataPipeline(make_config(train=path, format="prompt_completion", epochs=1), tokenizer)
    assert pipeline.train_report.examples == 4  # a warning: the rows still train
    warning = pipeline.warnings[UNKNOWN]
    assert warning["rows"] == 2 and warning["tokens"] == 3
    assert warning["example"] == f"{path}:3"
    assert "Zorblax" in warning["text"]
    logs = [m for m in data_logs(caplog) if "unknown token" in m]
    assert len(logs) == 1, data_logs(caplog)
    assert "2 rows" in logs[0] and "3 trained target tokens" in logs[0] and f"{path}:3" in logs[0]
    assert "Zorblax" in logs[0] and "'[UNK]'" in logs[0]
    # The unknown target really is trained (the mask is unchanged by the warning).
    unk = tokenizer.unk_token_id
    docs = pipeline._stages[0][0]
    assert int(((docs.tokens == unk) & docs.mask).sum()) == 3
    assert pipeline.warnings[BOUNDARY]["rows"] == 0


def test_unknown_tokens_in_text_and_chat_rows_and_none_without_unknowns(tmp_path, write_jsonl, make_config, caplog):
    tokenizer = wordlevel_tokenizer()
    path = write_jsonl(tmp_path / "text.jsonl", [{"text": "hello there the dog"}, {"text": "the Qwerty dog runs"}])
    pipeline = DataPipeline(make_config(train=path, epochs=1), tokenizer)
    assert pipeline.warnings[UNKNOWN] | {"text": None} == {"rows": 1, "tokens": 1, "example": f"{path}:2", "text": None}

    tokenizer.chat_template = ("{% for m in messages %}{{ m['role'] + ' : ' + m['content'] + ' </s> ' }}{% endfor %}"
                               "{% if add_generation_prompt %}{{ 'assistant : ' }}{% endif %}")
    path = write_jsonl(tmp_path / "chat.jsonl", [
            {"messages": [{"role": "user", "content": "Snark ?"}, {"role": "assistant", "content": "hello there"}]},
            {"messages": [{"role": "user", "content": "Where ?"}, {"role": "assistant", "content": "the Boojum"}]}])
    pipeline = DataPipeline(make_config(train=path, format="chat", epochs=1, roles=["user", "assistant"]), tokenizer)
    assert (pipeline.warnings[UNKNOWN]["rows"], pipeline.warnings[UNKNOWN]["tokens"]) == (1, 1)
    assert pipeline.warnings[UNKNOWN]["example"] == f"{path}:2" and "Boojum" in pipeline.warnings[UNKNOWN]["text"]

    caplog.clear()
    path = write_jsonl(tmp_path / "clean.jsonl", [{"text": "hello there the dog"}])
    with caplog.at_level(logging.INFO, logger="jaxft.data"):
        pipeline = DataPipeline(make_config(train=path, epochs=1), tokenizer)
    assert pipeline.warnings[UNKNOWN]["rows"] == 0 and not data_logs(caplog)


def test_unknown_token_that_is_also_eos_counts_only_unknown_text(tmp_path, write_jsonl, make_config):
    """GPT-2 style: unk_token == eos_token. The appended (trained) EOS is not an unknown token."""
    tokenizer = wordlevel_tokenizer(unk="</s>", eos="</s>")
    assert tokenizer.unk_token_id == tokenizer.eos_token_id
    path = write_jsonl(tmp_path / "eos.jsonl", [{"text": "hello there"}, {"text": "the </s> dog"},  # written EOS
                                                {"text": "the Jabberwock dog"}])
    pipeline = DataPipeline(make_config(train=path, epochs=1), tokenizer)
    assert (pipeline.warnings[UNKNOWN]["rows"], pipeline.warnings[UNKNOWN]["tokens"]) == (1, 1)
    assert pipeline.warnings[UNKNOWN]["example"] == f"{path}:3"


def test_unknown_tokens_cut_by_truncation_are_not_counted(tmp_path, write_jsonl, make_config):
    tokenizer = wordlevel_tokenizer()
    path = write_jsonl(tmp_path / "long.jsonl", [{"text": "hello there the dog runs fast Snark"},
                                                 {"text": "hello Snark"}])
    pipeline = DataPipeline(make_config(train=path, epochs=1, seq_len=4), tokenizer)
    assert pipeline.train_report.truncated == 1
    assert (pipeline.warnings[UNKNOWN]["rows"], pipeline.warnings[UNKNOWN]["example"]) == (1, f"{path}:2")


# ---- boundary inside a token ---------------------------------------------------------------------

def test_boundary_inside_a_token_is_counted_and_warned_once(tmp_path, write_jsonl, make_config, chatml_tokenizer,
                                                            caplog):
    rows = [
            {"prompt": "Q: What is the capital of France?\nA:", "completion": " Paris"},  # clean: ' Par' after ':'
            {"prompt": "Who is terse? The ass", "completion": "istant."},                # ' assistant' spans both
            {"prompt": "Q: What is the capital of France?\nA: ", "completion": "Paris"},  # ' Par': the prompt's space
    ]
    path = write_jsonl(tmp_path / "pc.jsonl", rows)
    with caplog.at_level(logging.INFO, logger="jaxft.data"):
        pipeline = DataPipeline(make_config(train=path, format="prompt_completion", epochs=1), chatml_tokenizer)
    warning = pipeline.warnings[BOUNDARY]
    assert warning["rows"] == 2 and warning["example"] == f"{path}:2"
    assert warning["text"] == " assistant"
    logs = [m for m in data_logs(caplog) if "boundary" in m]
    assert len(logs) == 1, data_logs(caplog)
    assert "2 rows" in logs[0] and f"{path}:2" in logs[0] and "' assistant'" in logs[0] and HINT in logs[0]
    assert pipeline.warnings[UNKNOWN]["rows"] == 0  # byte-level BPE: no unknown token

    # How such a token is masked (unchanged): it holds completion characters, so it is a trained target.
    docs = pipeline._stages[0][0]
    start, end = docs.offsets[1], docs.offsets[2]
    tokens, mask = docs.tokens[start:end], docs.mask[start:end]
    straddling = chatml_tokenizer.convert_tokens_to_ids("Ġassistant")
    assert mask[list(tokens).index(straddling)]


def test_boundary_inside_a_token_at_a_chat_assistant_turn(tmp_path, write_jsonl, make_config, chatml_tokenizer):
    tokenizer = chatml_tokenizer
    template = ("{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '<|im_end|>' }}{% endfor %}"
                "{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}")  # the space joins the answer
    path = write_jsonl(tmp_path / "chat.jsonl", [
            {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello there!"}]},
            {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": ", hello"}]}])
    pipeline = DataPipeline(make_config(train=path, format="chat", epochs=1, chat_template=template), tokenizer)
    assert pipeline.warnings[BOUNDARY]["rows"] == 1 and pipeline.warnings[BOUNDARY]["example"] == f"{path}:1"
    assert pipeline.warnings[BOUNDARY]["text"].startswith(" H")
    # The stock ChatML template puts '\n' before the answer: no warning.
    pipeline = DataPipeline(make_config(train=path, format="chat", epochs=1), tokenizer)
    assert pipeline.warnings[BOUNDARY]["rows"] == 0


def test_boundary_warning_with_a_wordlevel_missing_space(tmp_path, write_jsonl, make_config):
    tokenizer = wordlevel_tokenizer()
    path = write_jsonl(tmp_path / "pc.jsonl", [{"prompt": "The answer is", "completion": "Paris"},
                                               {"prompt": "The answer is", "completion": " Paris"}])
    pipeline = DataPipeline(make_config(train=path, format="prompt_completion", epochs=1), tokenizer)
    warning = pipeline.warnings[BOUNDARY]
    assert warning == {"rows": 1, "tokens": 1, "example": f"{path}:1", "text": "isParis", "prompt_chars": 2}
    assert pipeline.warnings[UNKNOWN]["rows"] == 1  # 'isParis' is not a word: the unknown token, trained


def test_warnings_survive_the_tokenized_cache_and_multiple_sources(tmp_path, write_jsonl, make_config, caplog):
    tokenizer = wordlevel_tokenizer()
    first = write_jsonl(tmp_path / "a.jsonl", [{"prompt": "The answer is", "completion": " Snark"}])
    second = write_jsonl(tmp_path / "b.jsonl", [{"prompt": "The answer is", "completion": " Paris"},
                                                {"prompt": "The answer is", "completion": " Boojum Snark"}])
    config = make_config(train=[first, second], format="prompt_completion", epochs=1, cache_dir=str(tmp_path / "c"))
    fresh = DataPipeline(config, tokenizer).warnings
    assert (fresh[UNKNOWN]["rows"], fresh[UNKNOWN]["tokens"], fresh[UNKNOWN]["example"]) == (2, 3, f"{first}:1")
    assert os.listdir(tmp_path / "c")
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="jaxft.data"):
        cached = DataPipeline(config, tokenizer).warnings
    assert "from cache" in " ".join(r.getMessage() for r in caplog.records)
    assert cached == fresh
    assert sum("unknown token" in m for m in data_logs(caplog)) == 2  # one per source, from the cache too


def test_preference_pairs_report_warnings(tmp_path, write_jsonl, make_config):
    from jaxft.data.preference import PreferenceData

    tokenizer = wordlevel_tokenizer()
    path = write_jsonl(tmp_path / "prefs.jsonl", [
            {"prompt": "The answer is", "chosen": " Paris", "rejected": " Redwater"},
            {"prompt": "The answer is", "chosen": " Paris", "rejected": " Snark"},
            {"prompt": "The answer is", "chosen": "Paris", "rejected": " nurse"}])
    data = PreferenceData(make_config(train=path, format="preference", seq_len=16), tokenizer, causal=True,
                          max_prompt_length=0)
    assert (data.warnings[UNKNOWN]["rows"], data.warnings[UNKNOWN]["example"]) == (2, f"{path}:2")
    assert data.warnings[UNKNOWN]["tokens"] == 2  # ' Snark' and 'isParis'
    assert (data.warnings[BOUNDARY]["rows"], data.warnings[BOUNDARY]["example"]) == (1, f"{path}:3")


# ---- JSONL whitespace lines and .json arrays -----------------------------------------------------

def test_whitespace_only_jsonl_lines_are_skipped_silently(tmp_path, make_config, chatml_tokenizer, caplog):
    path = tmp_path / "ws.jsonl"
    path.write_bytes(b'{"text": "hello there"}\n   \n\t\n \t \r\n\r\n{"text": "the quick fox"}\n \n{"txt": 1}\n')
    with caplog.at_level(logging.INFO, logger="jaxft.data"):
        pipeline = DataPipeline(make_config(train=str(path), epochs=1, on_error="skip"), chatml_tokenizer)
    assert pipeline.train_report.rows == 3 and pipeline.train_report.examples == 2
    assert dict(pipeline.train_report.skipped) == {"missing_field": 1}
    assert "ws.jsonl:8: missing field 'text'" in pipeline.train_report.summary()  # line numbers still count them
    with pytest.raises(DataError, match=r"ws\.jsonl:8: missing field"):
        DataPipeline(make_config(train=str(path), epochs=1), chatml_tokenizer)


def test_a_json_file_holding_one_array_is_read_as_rows(tmp_path, make_config, chatml_tokenizer, reference_docs,
                                                       read_docs):
    rows = [{"text": "hello there"}, {"text": "the quick brown fox"}, {"text": "alpha beta gamma"}]
    path = tmp_path / "rows.json"
    path.write_text(json.dumps(rows, indent=2))
    pipeline = DataPipeline(make_config(train=str(path), epochs=1, shuffle=False, packing=False, batch_size=1),
                            chatml_tokenizer)
    assert pipeline.train_report.rows == 3
    assert read_docs(pipeline) == reference_docs(rows, chatml_tokenizer)
    gz = tmp_path / "rows.json.gz"
    gz.write_bytes(gzip.compress(("\n  " + json.dumps(rows)).encode()))  # compact, after leading whitespace
    pipeline = DataPipeline(make_config(train=str(gz), epochs=1, shuffle=False, packing=False, batch_size=1),
                            chatml_tokenizer)
    assert read_docs(pipeline) == reference_docs(rows, chatml_tokenizer)
    # A .json file of JSON Lines still reads as JSON Lines.
    lines = tmp_path / "lines.json"
    lines.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert DataPipeline(make_config(train=str(lines), epochs=1), chatml_tokenizer).train_report.rows == 3


def test_bad_elements_of_a_json_array_name_the_line_they_start_on(tmp_path, make_config, chatml_tokenizer):
    path = tmp_path / "rows.json"
    path.write_text('[\n  {"text": "hello there"},\n  {"txt": "x"},\n  "a string",\n  {"text": "the fox"}\n]\n')
    with pytest.raises(DataError, match=r"rows\.json:3 \[1\]: missing field 'text'"):
        DataPipeline(make_config(train=str(path), epochs=1), chatml_tokenizer)
    pipeline = DataPipeline(make_config(train=str(path), epochs=1, on_error="skip"), chatml_tokenizer)
    assert pipeline.train_report.rows == 4 and pipeline.train_report.examples == 2
    assert dict(pipeline.train_report.skipped) == {"missing_field": 1, "malformed_json": 1}
    assert "rows.json:4 [2]: expected a JSON object" in pipeline.train_report.summary()

    broken = tmp_path / "broken.json"
    broken.write_text('[\n  {"text": "hello there"},\n  {"text": "the fox"\n  {"text": "x"}\n]\n')
    with pytest.raises(DataError, match=r"broken\.json:4: malformed JSON array: Expecting ','"):
        DataPipeline(make_config(train=str(broken), epochs=1), chatml_tokenizer)


# ---- report.json ----------------------------------------------------------------------------------

def test_report_json_holds_the_data_warnings(tmp_path):
    """A demo smoke run on a copy of the demo model whose tokenizer has an unknown token."""
    from jaxft import config as config_lib
    from jaxft import train
    from jaxft.demo import MODEL_DIR

    folder = tmp_path / "model"
    shutil.copytree(MODEL_DIR, folder)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        if (folder / name).exists():
            os.remove(folder / name)
    tokenizer = wordlevel_tokenizer()
    tokenizer.save_pretrained(folder)
    rows = [{"prompt": "Q : Where does Ann live ?\nA :", "completion": " Redwater"},
            {"prompt": "Q : What job ?\nA :", "completion": " Zorblax"},                  # unknown, line 2
            {"prompt": "Q : Where does Ann live ?\nA : The answer is", "completion": "Paris"},  # boundary (and unknown)
            {"prompt": "Q : What job ?\nA :", "completion": " nurse"}]
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    config = config_lib.load(os.path.join(root, "configs", "demo.py") + ":smoke", [
            f"--config.workdir={tmp_path / 'run'}", f"--config.model.path={folder}", f"--config.data.train={path}",
            "--config.train.steps=1",
            "--config.checkpoint.async_save=False"])
    config.eval.task_file = None
    config.data.validation = None
    train.train(config)
    saved = json.loads((tmp_path / "run" / "report.json").read_text())
    warnings = saved["data_warnings"]
    assert (warnings[UNKNOWN]["rows"], warnings[UNKNOWN]["tokens"], warnings[UNKNOWN]["example"]) == (2, 2, f"{path}:2")
    assert (warnings[BOUNDARY]["rows"], warnings[BOUNDARY]["example"]) == (1, f"{path}:3")
    assert np.isfinite(saved["step"])


def test_preference_pairs_cut_to_fit_count_only_what_they_keep(tmp_path, write_jsonl, make_config):
    from jaxft.data.preference import PreferenceData

    tokenizer = wordlevel_tokenizer()
    prompt = "Q : Where does Ann live ? The answer is"  # 9 tokens: cut to its last 3 (max_prompt_length)
    path = write_jsonl(tmp_path / "prefs.jsonl", [
            {"prompt": prompt, "chosen": " Paris Snark", "rejected": " nurse"},        # kept after the cut
            {"prompt": prompt, "chosen": " Paris a a a Snark", "rejected": " nurse"}])  # Snark cut off
    data = PreferenceData(make_config(train=path, format="preference", seq_len=6, batch_size=1), tokenizer,
                          causal=True, max_prompt_length=3)
    assert data.report["train"]["truncated"] == 2
    assert (data.warnings[UNKNOWN]["rows"], data.warnings[UNKNOWN]["tokens"]) == (1, 1)
    assert data.warnings[UNKNOWN]["example"] == f"{path}:1"
