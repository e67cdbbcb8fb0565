"""Batches: contract, packing invariants, determinism, exact resume, disjoint host shards, cache."""

import collections
import json
import os

import numpy as np
import pytest

from jaxft.data import DataError, DataPipeline, formats

CHAT = [{"messages": [{"role": "system", "content": "You are terse."},
                                            {"role": "user", "content": f"What is two plus {i}?" + " please" * (i % 7)},
                                            {"role": "assistant", "content": f"It is {i + 2}." + " Thanks" * (i % 5)}]}
                for i in range(40)]


@pytest.fixture
def chat_file(tmp_path, write_jsonl):
    return write_jsonl(tmp_path / "chat.jsonl", CHAT)


def take(iterator, n):
    return [next(iterator) for _ in range(n)]


def assert_same_batches(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for key in x:
            np.testing.assert_array_equal(x[key], y[key], err_msg=key)


def test_packed_batches_follow_the_contract(chat_file, make_config, chatml_tokenizer,
                                                                                        reference_docs, document_tokens):
    config = make_config(train=chat_file, format="chat", seq_len=96, batch_size=4, epochs=1)
    iterator = DataPipeline(config, chatml_tokenizer).train_iterator()
    docs, real_tokens, trained, slots = [], 0, 0, 0
    for batch in iterator:
        real_tokens += int(batch["attention_mask"].sum())
        trained += int(batch["loss_mask"].sum())
        slots += batch["attention_mask"].size
        assert {k: (v.shape, v.dtype.name) for k, v in batch.items()} == {
                "input_ids": ((4, 96), "int32"), "targets": ((4, 96), "int32"),
                "loss_mask": ((4, 96), "float32"), "segment_ids": ((4, 96), "int32"),
                "positions": ((4, 96), "int32"), "attention_mask": ((4, 96), "int32")}
        for row in range(4):
            segments, positions = batch["segment_ids"][row], batch["positions"][row]
            real = segments > 0
            np.testing.assert_array_equal(batch["attention_mask"][row], real)
            assert not batch["loss_mask"][row][~real].any()
            # Documents are contiguous, numbered 1..n, positions restart at 0 for each.
            starts = np.flatnonzero(real & (np.diff(segments, prepend=0) != 0))
            np.testing.assert_array_equal(segments[starts], np.arange(1, len(starts) + 1))
            assert (positions[starts] == 0).all()
            inside = real & (np.diff(segments, prepend=0) == 0)
            np.testing.assert_array_equal(positions[inside], positions[np.flatnonzero(inside) - 1] + 1)
            # Within a document, the target at t is the input at t + 1: no target crosses documents.
            same_doc = real[:-1] & (segments[:-1] == segments[1:])
            np.testing.assert_array_equal(batch["targets"][row][:-1][same_doc],
                                                                        batch["input_ids"][row][1:][same_doc])
        docs += document_tokens(batch)
    # One epoch: every document exactly once, except those in a final partial batch (dropped).
    expected = collections.Counter(reference_docs(CHAT, chatml_tokenizer, format="chat"))
    seen = collections.Counter(docs)
    assert not seen - expected and sum((expected - seen).values()) < 4 * 3
    stats = iterator.stats()
    assert stats["documents"] == len(docs)
    assert stats["packing_efficiency"] == pytest.approx(real_tokens / slots)
    assert stats["trained_fraction"] == pytest.approx(trained / slots)
    assert 0 < trained < real_tokens < slots


def test_padding_mode_one_document_per_row(chat_file, make_config, chatml_tokenizer):
    config = make_config(train=chat_file, format="chat", seq_len=96, packing=False, batch_size=4)
    batch = next(DataPipeline(config, chatml_tokenizer).train_iterator())
    assert set(np.unique(batch["segment_ids"])) == {0, 1}
    for row in range(4):
        n = int(batch["attention_mask"][row].sum())
        np.testing.assert_array_equal(batch["positions"][row][:n], np.arange(n))
        assert batch["attention_mask"][row][n:].sum() == 0


def test_same_seed_same_batches_other_seed_other_batches(chat_file, make_config, chatml_tokenizer):
    def first_batches(seed):
        config = make_config(train=chat_file, format="chat", seq_len=64, batch_size=2, seed=seed)
        return take(DataPipeline(config, chatml_tokenizer).train_iterator(), 6)
    assert_same_batches(first_batches(7), first_batches(7))
    with pytest.raises(AssertionError):
        assert_same_batches(first_batches(7), first_batches(8))


@pytest.mark.parametrize("packing,weights", [(True, None), (False, None), (True, [2.0, 1.0])])
def test_restored_iterator_continues_exactly(tmp_path, write_jsonl, make_config, chatml_tokenizer,
                                                                                          packing, weights):
    # Small sources so the 30 batches cross several epochs (and reshuffles) of each.
    first = write_jsonl(tmp_path / "a.jsonl", CHAT[:9])
    second = write_jsonl(tmp_path / "b.jsonl", CHAT[20:25])
    config = make_config(train=[first, second], weights=weights, format="chat", seq_len=64,
                                              packing=packing, batch_size=2, seed=3, prefetch=2)
    uninterrupted = take(DataPipeline(config, chatml_tokenizer).train_iterator(), 30)

    iterator = DataPipeline(config, chatml_tokenizer).train_iterator()
    assert_same_batches(take(iterator, 11), uninterrupted[:11])
    state = json.loads(json.dumps(iterator.get_state()))  # as a checkpoint would store it
    take(iterator, 3)  # the old iterator runs on; the restore must not care
    restored = DataPipeline(config, chatml_tokenizer).train_iterator()
    restored.set_state(state)
    assert_same_batches(take(restored, 19), uninterrupted[11:])
    assert restored.stats()["batches"] == 30


def test_restore_into_a_different_pipeline_is_refused(chat_file, make_config, chatml_tokenizer):
    config = make_config(train=chat_file, format="chat", seq_len=64, batch_size=2)
    iterator = DataPipeline(config, chatml_tokenizer).train_iterator()
    take(iterator, 2)
    state = iterator.get_state()
    config.train.batch_size = 4
    other = DataPipeline(config, chatml_tokenizer).train_iterator()
    with pytest.raises(DataError, match=r"data or config changed.*'host_batch_size': \(2, 4\)"):
        other.set_state(state)


@pytest.mark.parametrize("hosts", [2, 4])
def test_host_shards_are_disjoint_and_cover_the_data(chat_file, make_config, chatml_tokenizer,
                                                                                                          read_docs, reference_docs, hosts):
    shards = []
    for host in range(hosts):
        config = make_config(train=chat_file, format="chat", seq_len=96, packing=False, epochs=1,
                                                  batch_size=hosts, process_index=host, process_count=hosts)
        pipeline = DataPipeline(config, chatml_tokenizer)
        # Each host reads and tokenizes only its own rows.
        assert pipeline.train_report.rows == len(range(host, len(CHAT), hosts))
        shards.append(read_docs(pipeline))
    for i in range(hosts):
        for j in range(i + 1, hosts):
            assert not set(shards[i]) & set(shards[j])
    everything = sorted(doc for shard in shards for doc in shard)
    assert everything == sorted(reference_docs(CHAT, chatml_tokenizer, format="chat"))


def test_more_hosts_than_rows_is_an_error(tmp_path, write_jsonl, make_config, chatml_tokenizer):
    path = write_jsonl(tmp_path / "tiny.jsonl", [{"text": "Hello there"}])
    config = make_config(train=path, batch_size=2, process_index=1, process_count=2)
    with pytest.raises(DataError, match=r"no training examples left on host 1 of 2 \(1 rows in all\)"):
        DataPipeline(config, chatml_tokenizer)


def test_tokenized_cache_is_reused_and_identical(chat_file, tmp_path, make_config,
                                                                                                  chatml_tokenizer, monkeypatch):
    cache = str(tmp_path / "cache")
    config = make_config(train=chat_file, format="chat", seq_len=64, cache_dir=cache, on_error="skip")
    fresh = take(DataPipeline(config, chatml_tokenizer).train_iterator(), 5)
    assert len([f for f in os.listdir(cache) if f.endswith(".npz")]) == 1

    def no_tokenizing(*args, **kwargs):
        raise AssertionError("tokenized again despite the cache")
    monkeypatch.setattr(formats.Encoder, "encode", no_tokenizing)
    cached_pipeline = DataPipeline(config, chatml_tokenizer)
    assert cached_pipeline.train_report.examples == len(CHAT)
    assert_same_batches(take(cached_pipeline.train_iterator(), 5), fresh)
    # Another seq_len is another cache entry (tokenizing again: here, the patched failure).
    config.data.seq_len = 32
    with pytest.raises(AssertionError, match="despite the cache"):
        DataPipeline(config, chatml_tokenizer)


def test_finite_epochs_end_the_iterator(chat_file, make_config, chatml_tokenizer):
    config = make_config(train=chat_file, format="chat", seq_len=96, packing=False, epochs=2,
                                              batch_size=4)
    batches = list(DataPipeline(config, chatml_tokenizer).train_iterator())
    assert len(batches) == 2 * len(CHAT) // 4


def test_plain_dataclass_config_works_like_a_configdict(chat_file, make_config, chatml_tokenizer):
    import dataclasses

    from jaxft.data import DataDefaults

    @dataclasses.dataclass
    class Train:
        batch_size: int = 2
        seed: int = 5

    @dataclasses.dataclass
    class Run:
        data: DataDefaults
        train: Train

    run = Run(DataDefaults(train=chat_file, format="chat", seq_len=64, prefetch=0, process_index=0,
                                                  process_count=1), Train())
    from_dataclass = take(DataPipeline(run, chatml_tokenizer).train_iterator(), 3)
    config = make_config(train=chat_file, format="chat", seq_len=64, batch_size=2, seed=5)
    assert_same_batches(from_dataclass, take(DataPipeline(config, chatml_tokenizer).train_iterator(), 3))
