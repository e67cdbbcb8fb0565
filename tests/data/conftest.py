"""Shared helpers for the data tests: tiny local tokenizers, stock-style chat templates, files.

No downloads: a byte-level BPE is trained on a few sentences with the `tokenizers` library and
wrapped in `transformers.PreTrainedTokenizerFast`. Two styles, each with a template written here
in the shape of the stock one and, like the stock ones, without `{% generation %}` markers:
    chatml: Qwen-style, EOS = <|im_end|>, no BOS added by the tokenizer
    llama3: Llama-3-style, BOS <|begin_of_text|> (added by the tokenizer and rendered by the
                    template), EOS = <|eot_id|>, content trimmed by the template
"""

import functools
import json

import ml_collections
import pytest

SPECIAL_TOKENS = ["<pad>", "<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>",
                                    "<|start_header_id|>", "<|end_header_id|>", "<|im_start|>", "<|im_end|>"]

CHATML_TEMPLATE = (
        "{% for message in messages %}"
        "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")

# Shaped like Meta's Llama-3 template: BOS on the first message, content trimmed, <|eot_id|>.
LLAMA3_TEMPLATE = (
        "{% set loop_messages = messages %}"
        "{% for message in loop_messages %}"
        "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
        " + message['content'] | trim + '<|eot_id|>' %}"
        "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
        "{{ content }}"
        "{% endfor %}"
        "{% if add_generation_prompt %}"
        "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}"
        "{% endif %}")

CORPUS = [
        "You are a terse assistant. Hello there! How can I help you today?",
        "What is two plus two? Four. What is the capital of France? Paris.",
        "The quick brown fox jumps over the lazy dog near the river bank.",
        "Tell me a joke about cats and dogs, please. Cats sleep all day long.",
        "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu",
        "Translate to French: good morning. Bonjour. Thanks a lot for the help!",
        "doc number one two three four five six seven eight nine ten eleven twelve",
        "system user assistant tool robot question answer summary story poem",
]


@functools.lru_cache(maxsize=None)
def _tokenizer(style: str):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=420, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator(CORPUS * 4, trainer)
    if style == "llama3":
        bos = backend.token_to_id("<|begin_of_text|>")
        backend.post_processor = processors.TemplateProcessing(
                single="<|begin_of_text|> $A", special_tokens=[("<|begin_of_text|>", bos)])
        tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<|begin_of_text|>",
                                                                                eos_token="<|eot_id|>", pad_token="<pad>")
        tokenizer.chat_template = LLAMA3_TEMPLATE
    elif style == "chatml":
        tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|im_end|>",
                                                                                pad_token="<pad>")
        tokenizer.chat_template = CHATML_TEMPLATE
    else:
        raise ValueError(style)
    return tokenizer


@pytest.fixture
def chatml_tokenizer():
    return _tokenizer("chatml")


@pytest.fixture
def llama3_tokenizer():
    return _tokenizer("llama3")


@pytest.fixture
def make_tokenizer():
    return _tokenizer


def _write_jsonl(path, rows):
    """rows: dicts (dumped as JSON) or raw strings (written as they are, for malformed lines)."""
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write((row if isinstance(row, str) else json.dumps(row)) + "\n")
    return str(path)


@pytest.fixture
def write_jsonl():
    return _write_jsonl


def _make_config(*, batch_size=2, seed=0, **data):
    """A run config as the CLI will build it: ConfigDict with `data` and `train` sections."""
    from jaxft.data import default_config

    config = ml_collections.ConfigDict()
    config.data = default_config()
    config.data.prefetch = 0  # no background thread: tests stay single-threaded and quiet
    config.data.process_index = 0
    config.data.process_count = 1
    for key, value in data.items():
        config.data[key] = value
    config.train = ml_collections.ConfigDict({"batch_size": batch_size, "seed": seed})
    return config


@pytest.fixture
def make_config():
    return _make_config


def text_docs(n, words=6):
    """n distinct small documents built from corpus words."""
    vocab = " ".join(CORPUS).replace(".", "").replace("?", "").replace("!", "").split()
    return [{"text": " ".join(vocab[(i * 7 + j * 3) % len(vocab)] for j in range(words + i % 5))
                      + f" {i}"} for i in range(n)]


@pytest.fixture
def make_text_docs():
    return text_docs


def document_tokens(batch):
    """Full token sequences of the documents in a batch (packed or padded), in order."""
    docs = []
    for row in range(batch["input_ids"].shape[0]):
        segments = batch["segment_ids"][row]
        for segment in [s for s in dict.fromkeys(segments.tolist()) if s > 0]:
            where = segments == segment
            inputs, targets = batch["input_ids"][row][where], batch["targets"][row][where]
            docs.append((*inputs.tolist(), int(targets[-1])))
    return docs


def _read_docs(pipeline, batches=None):
    """Documents (token tuples) of `batches` batches, or of the whole (finite) iterator."""
    iterator = pipeline.train_iterator()
    docs = []
    for i, batch in enumerate(iterator):
        docs += document_tokens(batch)
        if batches is not None and i + 1 == batches:
            break
    iterator.close()
    return docs


@pytest.fixture(name="document_tokens")
def document_tokens_fixture():
    return document_tokens


@pytest.fixture
def read_docs():
    return _read_docs


@pytest.fixture
def reference_docs(tmp_path, make_config):
    """Documents of `rows` read from a JSONL file in one pass, in file order: the ground truth
    other sources are compared with."""
    from jaxft.data import DataPipeline

    def read(rows, tokenizer, **data):
        path = _write_jsonl(tmp_path / "reference.jsonl", rows)
        config = make_config(**{**data, "train": path, "epochs": 1, "shuffle": False,
                                                        "packing": False}, batch_size=1)
        return _read_docs(DataPipeline(config, tokenizer))
    return read
