"""Sources (JSONL globs, Parquet, HF datasets, TFDS array_record), mixtures, stages, validation."""

import collections
import importlib
import os
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from jaxft.data import DataPipeline

FIXTURES = os.path.join(os.path.dirname(__file__), "tfds_fixture")


def chat_rows(n, tag="q"):
    return [{"messages": [{"role": "user", "content": f"What is two plus {tag} {i}?"},
                                                {"role": "assistant", "content": f"Four {i}."}]} for i in range(n)]


def one_pass(make_config, tokenizer, **data):
    config = make_config(**{"epochs": 1, "shuffle": False, "packing": False, **data}, batch_size=1)
    return DataPipeline(config, tokenizer)


def test_jsonl_glob_over_several_files(tmp_path, write_jsonl, make_config, read_docs,
                                                                              reference_docs, chatml_tokenizer, make_text_docs):
    rows = make_text_docs(12)
    for part in range(3):
        write_jsonl(tmp_path / f"part-{part}.jsonl", rows[part * 4:(part + 1) * 4])
    pipeline = one_pass(make_config, chatml_tokenizer, train=str(tmp_path / "part-*.jsonl"))
    assert read_docs(pipeline) == reference_docs(rows, chatml_tokenizer)


def test_parquet_files_with_chat_rows(tmp_path, make_config, read_docs, reference_docs,
                                                                            chatml_tokenizer):
    rows = chat_rows(6)
    pq.write_table(pa.Table.from_pylist(rows[:4]), tmp_path / "a.parquet")
    pq.write_table(pa.Table.from_pylist(rows[4:]), tmp_path / "b.parquet")
    pipeline = one_pass(make_config, chatml_tokenizer, train=str(tmp_path / "*.parquet"),
                                            format="chat")
    assert read_docs(pipeline) == reference_docs(rows, chatml_tokenizer, format="chat")


def test_hf_datasets_saved_to_disk_with_splits(tmp_path, make_config, read_docs, reference_docs,
                                                                                              chatml_tokenizer, document_tokens):
    import datasets  # pylint: disable=g-import-not-at-top
    train, validation = chat_rows(5), chat_rows(3, tag="v")
    folder = str(tmp_path / "hf")
    datasets.DatasetDict({"train": datasets.Dataset.from_list(train),
                                                "validation": datasets.Dataset.from_list(validation)}).save_to_disk(folder)
    pipeline = one_pass(make_config, chatml_tokenizer, train=f"hf:{folder}",
                                            validation=f"hf:{folder}", format="chat")
    assert read_docs(pipeline) == reference_docs(train, chatml_tokenizer, format="chat")
    val_docs = [d for b in pipeline.validation_batches() for d in document_tokens(b)]
    assert val_docs == reference_docs(validation, chatml_tokenizer, format="chat")


def test_tfds_array_record_dataset_built_in_the_test(tmp_path, monkeypatch, make_config, read_docs,
                                                                                                          reference_docs, chatml_tokenizer,
                                                                                                          document_tokens):
    monkeypatch.syspath_prepend(FIXTURES)
    fixture = importlib.import_module("jaxft_tiny_chat.jaxft_tiny_chat_dataset_builder")
    data_dir = str(tmp_path / "tfds")
    fixture.Builder(data_dir=data_dir, file_format="array_record").download_and_prepare()
    assert any(f.endswith(".array_record-00000-of-00001") for _, _, files in os.walk(data_dir)
                          for f in files)

    pipeline = one_pass(make_config, chatml_tokenizer, train="tfds:jaxft_tiny_chat",
                                            validation="tfds:jaxft_tiny_chat", tfds_data_dir=data_dir, format="chat")
    # TFDS shuffles records when it writes them: compare as multisets.
    expected = reference_docs(fixture.rows("train", 12), chatml_tokenizer, format="chat")
    assert sorted(read_docs(pipeline)) == sorted(expected)
    val_docs = [d for b in pipeline.validation_batches() for d in document_tokens(b)]
    expected = reference_docs(fixture.rows("validation", 4), chatml_tokenizer, format="chat")
    assert sorted(val_docs) == sorted(expected)
    # The text field of the same dataset, with TFDS split slicing.
    pipeline = one_pass(make_config, chatml_tokenizer, train="tfds:jaxft_tiny_chat@train[:50%]",
                                            tfds_data_dir=data_dir, format="text")
    assert pipeline.train_report.examples == 6
    assert "tensorflow" not in sys.modules


def test_weighted_mixture_follows_weights(tmp_path, write_jsonl, make_config, read_docs,
                                                                                    reference_docs, chatml_tokenizer, make_text_docs):
    rows = make_text_docs(14)
    a = write_jsonl(tmp_path / "a.jsonl", rows[:4])
    b = write_jsonl(tmp_path / "b.jsonl", rows[4:])
    docs_a = set(reference_docs(rows[:4], chatml_tokenizer))
    config = make_config(train=[a, {"path": b}], weights=[3.0, 1.0], packing=False, batch_size=4)
    seen = read_docs(DataPipeline(config, chatml_tokenizer), batches=100)
    from_a = sum(doc in docs_a for doc in seen)
    assert len(seen) == 400 and from_a == 300  # a small source is repeated (epochs) to keep its share
    assert len(set(seen) - docs_a) == 10       # every row of b shows up


def test_multi_task_sources_with_their_own_format_and_fields(
        tmp_path, write_jsonl, make_config, chatml_tokenizer):
    chat = write_jsonl(tmp_path / "chat.jsonl", chat_rows(3))
    text = write_jsonl(tmp_path / "text.jsonl", [{"body": "Hello there"}, {"body": "Good morning"}])
    config = make_config(train=[{"path": chat, "format": "chat", "weight": 1.0},
                                                            {"path": text, "format": "text", "text_field": "body", "weight": 1.0}])
    pipeline = DataPipeline(config, chatml_tokenizer)
    assert pipeline.train_report.examples == 5 and not pipeline.train_report.skipped


def test_curriculum_stages_run_in_order(tmp_path, write_jsonl, make_config, read_docs,
                                                                                reference_docs, chatml_tokenizer, make_text_docs):
    rows = make_text_docs(10)
    easy = write_jsonl(tmp_path / "easy.jsonl", rows[:4])
    hard = write_jsonl(tmp_path / "hard.jsonl", rows[4:])
    config = make_config(train=None, stages=[{"train": easy, "epochs": 2}, {"train": hard}],
                                              packing=False, batch_size=1)
    seen = read_docs(DataPipeline(config, chatml_tokenizer), batches=20)
    easy_docs = reference_docs(rows[:4], chatml_tokenizer)
    hard_docs = set(reference_docs(rows[4:], chatml_tokenizer))
    assert collections.Counter(seen[:8]) == collections.Counter(easy_docs * 2)
    assert all(doc in hard_docs for doc in seen[8:])
    assert set(seen[8:14]) == hard_docs  # the last stage is shuffled and repeats


@pytest.mark.parametrize("hosts", [1, 2])
def test_held_out_validation_fraction(tmp_path, write_jsonl, make_config, read_docs,
                                                                            reference_docs, chatml_tokenizer, make_text_docs,
                                                                            document_tokens, hosts):
    rows = make_text_docs(20)
    path = write_jsonl(tmp_path / "all.jsonl", rows)
    all_docs = set(reference_docs(rows, chatml_tokenizer))
    train_docs, val_docs, batch_counts = [], [], set()
    for host in range(hosts):
        config = make_config(train=path, validation_fraction=0.25, epochs=1, packing=False,
                                                  batch_size=hosts, process_index=host, process_count=hosts)
        pipeline = DataPipeline(config, chatml_tokenizer)
        train_docs += read_docs(pipeline)
        batches = pipeline.validation_batches()
        batch_counts.add(len(batches))
        val_docs += [d for b in batches for d in document_tokens(b)]
    assert len(batch_counts) == 1            # every host runs the same number of eval steps
    assert len(val_docs) == 5 and len(set(val_docs)) == 5
    assert sorted(train_docs + val_docs) == sorted(all_docs)
