"""Rebuilds the bundled demo: a synthetic corpus, its BPE tokenizer, a tiny Llama pre-trained on it
by jaxft itself, and the fine-tuning facts.

    python -m jaxft.demo.build               # everything (pre-training: ~15-25 min on 2 CPU cores)
    python -m jaxft.demo.build --facts-only  # rewrite facts_train.jsonl / facts_eval.jsonl only

The corpus is generated from the templates and word lists below (seeded, so it is the same on
every run): short stories about bakers, rivers, markets and weather, profiles of made-up people,
and question/answer pairs about those people in one fixed format,

    Q: Where does Mira Tolvane live?\\nA: Greywick
    Q: What is Mira Tolvane's job?\\nA: potter
    Q: What pet does Mira Tolvane have?\\nA: a grey heron

so the base model knows some English, knows the Q/A format, and has learned to look facts up by a
name. The fine-tuning facts (facts_train.jsonl, facts_eval.jsonl) ask the same questions about
people whose first and last names never occur in the corpus: the base model answers them in the
right form but cannot know the answers (exact match near 0) until `jaxft train --config
configs/demo.py` teaches them.

The model: Llama, hidden 128, 4 layers, 4 heads / 2 KV heads, MLP 384, vocab 1024, tied
embeddings, float32 (about 3.7 MB). Pre-training is full fine-tuning from random weights with
data.format="text" (see `pretrain_config`), then `jaxft.save_pretrained` into jaxft/demo/model/.

The bundled model was made by `python -m jaxft.demo.build` (1500 steps of 32 x 128 tokens, about
45 passes over the 127k-token corpus) in 1441 s on 2 shared CPU cores: train loss 5.65 at step 25,
0.45 at step 500, 0.199 at step 1500. It answers its corpus's questions exactly (100% of the first
96) and the fine-tuning questions 0/48; greedy from "The baker opens the shop and" it continues
" then bakes fresh bread. The clockmaker cleans the tiny wheels and later winds the town clock."
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import tempfile
import time

from jaxft.demo import DEMO_DIR, FACTS_EVAL, FACTS_TRAIN, MODEL_DIR

CHATML_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
SPECIAL_TOKENS = ["<|pad|>", "<|bos|>", "<|eos|>", "<|im_start|>", "<|im_end|>"]
VOCAB_SIZE = 1024
SEED = 1234

HF_CONFIG = {
    "model_type": "llama", "hidden_size": 128, "intermediate_size": 384, "num_hidden_layers": 4,
    "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 256, "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0, "tie_word_embeddings": True,
}

# ---- the world --------------------------------------------------------------------------------
TOWNS = ["Greywick", "Millbrook", "Stonehaven", "Redwater", "Elmstead", "Fairhollow", "Oakmere", "Thornbury",
         "Willowby", "Larkspur", "Cobbleton", "Duskvale", "Foxhollow", "Hartwell", "Ironbridge", "Brackenfield",
         "Ashgrove", "Saltmarsh", "Pinecrest", "Rosedale", "Copperhill", "Mossbank", "Windmere", "Highcliff"]
JOBS = ["baker", "farmer", "fisher", "potter", "weaver", "smith", "miller", "carpenter", "teacher", "doctor",
        "sailor", "painter", "singer", "tailor", "gardener", "builder", "cook", "merchant", "shepherd", "brewer",
        "mason", "nurse", "poet", "clockmaker"]
COLORS = ["red", "blue", "green", "grey", "black", "white", "brown", "golden", "yellow", "silver"]
ANIMALS = ["cat", "dog", "fox", "owl", "goat", "horse", "rabbit", "heron", "crow", "tortoise", "mouse", "parrot"]

# What each job's person does: verb phrases for the stories (third person singular).
JOB_ACTS = {
    "baker": ["opens the shop", "bakes fresh bread", "sells warm rolls", "sweeps the flour from the floor"],
    "farmer": ["feeds the cows", "ploughs the field", "brings eggs to the market", "mends the old fence"],
    "fisher": ["mends the nets", "takes the boat out", "sells fish at the harbour", "watches the tide"],
    "potter": ["shapes a bowl of clay", "fires the kiln", "paints the jugs", "sells cups at the market"],
    "weaver": ["spins the wool", "weaves a red blanket", "sells cloth at the market", "sorts the thread"],
    "smith": ["lights the forge", "shapes a horseshoe", "sharpens the tools", "mends a broken gate"],
    "miller": ["grinds the wheat", "opens the mill", "carries sacks of flour", "oils the wheel"],
    "carpenter": ["builds a table", "cuts the planks", "mends the roof", "carves a wooden bird"],
    "teacher": ["opens the school", "reads a story to the children", "writes on the board", "marks the lessons"],
    "doctor": ["visits the sick", "opens the clinic", "mixes a tonic", "writes a letter to the city"],
    "sailor": ["sails out of the harbour", "ties the ropes", "mends the sail", "sings on the deck"],
    "painter": ["paints the hills", "mixes the colors", "sells a picture", "paints the town hall"],
    "singer": ["sings in the square", "learns a new song", "sings at the inn", "practises by the river"],
    "tailor": ["sews a coat", "measures the mayor", "mends a torn shirt", "sells hats at the market"],
    "gardener": ["waters the roses", "plants the beans", "cuts the hedge", "picks the apples"],
    "builder": ["lays the bricks", "builds a wall", "mends the bridge", "carries stones up the hill"],
    "cook": ["makes a pot of soup", "cooks for the inn", "bakes a pie", "buys onions at the market"],
    "merchant": ["opens the stall", "counts the coins", "sells spices", "travels to the city"],
    "shepherd": ["leads the sheep up the hill", "counts the lambs", "sleeps under a tree", "calls the dog"],
    "brewer": ["brews the ale", "fills the barrels", "sells cider at the inn", "cleans the copper pots"],
    "mason": ["cuts the stone", "builds a tower", "mends the church wall", "carves a name in stone"],
    "nurse": ["cares for the sick", "washes the linen", "opens the clinic", "brings soup to the old man"],
    "poet": ["writes a poem", "reads in the square", "walks by the river", "sits under the old oak"],
    "clockmaker": ["mends a clock", "winds the town clock", "sells a watch", "cleans the tiny wheels"],
}
TIMES = ["in the morning", "every morning", "before dawn", "at noon", "in the evening", "on Sundays",
         "after lunch", "all day", "late at night", "in the spring", "in the winter", "once a week"]
CONNECT = ["and then", "and", "and later"]
PLACES = ["the market", "the river", "the old mill", "the harbour", "the square", "the inn", "the church",
          "the school", "the forest", "the hill", "the bridge", "the station", "the farm", "the library"]
WEATHER = ["It rained all day", "The sun was warm", "A cold wind came from the sea", "Snow fell in the night",
           "The fog was thick", "The sky was clear"]
NATURE = [
    "The river runs past the old mill and under the stone bridge before it reaches the sea.",
    "The river runs fast in the spring when the snow melts on the hills.",
    "The river runs slowly through the green fields and past the farm.",
    "The train to the city leaves at seven and comes back at nine.",
    "The train to the city leaves at noon and stops at every station.",
    "The old oak stands on the hill above the town.",
    "The birds sing in the trees while the sun comes up.",
    "The moon is bright and the streets are quiet.",
    "The market is busy on Saturdays, and people come from every town.",
    "The bells of the church ring at noon.",
    "The boats come back to the harbour in the evening.",
    "The children play by the river after school.",
]
WEATHER_AFTER = ["so the children stayed inside", "so the streets were empty", "so everyone went to the market",
                 "and the farmers were happy", "and the boats stayed in the harbour", "so the inn was full"]

ONSETS = ["b", "d", "f", "g", "h", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "br", "dr", "st", "th", "tr",
          "sh", "j", "w"]
VOWELS = ["a", "e", "i", "o", "u", "a", "e", "o", "ia", "ea", "ai", "ou"]
CODAS = ["", "", "", "", "n", "l", "r", "s", "th", "nd", "ra", "na", "x"]

PEOPLE_PRETRAIN = 200  # people the corpus tells about
PEOPLE_FINETUNE = 16   # new people: 3 facts each = 48 fine-tuning facts
QUESTIONS = {
    "town": ("Where does {name} live?", "{town}"),
    "job": ("What is {name}'s job?", "{job}"),
    "pet": ("What pet does {name} have?", "a {color} {animal}"),
}


def qa_prompt(question: str) -> str:
    return f"Q: {question}\nA:"


def make_people(rng: random.Random) -> tuple[list[dict], list[dict]]:
    """(pre-training people, fine-tuning people): names are unique, and no first or last name of a
    fine-tuning person occurs among the pre-training people's."""
    words: set[str] = set()
    while len(words) < 1400:
        syllables = 2
        word = "".join(rng.choice(ONSETS) + rng.choice(VOWELS) + (rng.choice(CODAS) if i == syllables - 1 else "")
                       for i in range(syllables))
        if 4 <= len(word) <= 8:
            words.add(word.capitalize())
    words = sorted(words)
    rng.shuffle(words)
    # Pre-training names draw from the first 1000 words, fine-tuning names from the rest.
    pools = {"pretrain": (words[:300], words[300:1000], PEOPLE_PRETRAIN),
             "finetune": (words[1000:1100], words[1100:], PEOPLE_FINETUNE)}
    out = {}
    for split, (firsts, lasts, count) in pools.items():
        names = set()
        while len(names) < count:
            names.add(f"{rng.choice(firsts)} {rng.choice(lasts)}")
        people = []
        for name in sorted(names):
            people.append({"name": name, "town": rng.choice(TOWNS), "job": rng.choice(JOBS),
                           "color": rng.choice(COLORS), "animal": rng.choice(ANIMALS), "she": rng.random() < 0.5})
        rng.shuffle(people)
        out[split] = people
    return out["pretrain"], out["finetune"]


def qa_pairs(person: dict) -> list[tuple[str, str]]:
    """[(prompt, answer)] for one person, in the fixed format; answers are one line, no trailing space."""
    return [(qa_prompt(q.format(**person)), a.format(**person)) for q, a in QUESTIONS.values()]


def profile(person: dict, rng: random.Random) -> str:
    p = person
    she = "She" if p["she"] else "He"
    her = "Her" if p["she"] else "His"
    act = rng.choice(JOB_ACTS[p["job"]])
    options = [
        f"{p['name']} lives in {p['town']}. {she} is a {p['job']} and has a {p['color']} {p['animal']}.",
        f"{p['name']} is a {p['job']} in {p['town']}. {she} {act} {rng.choice(TIMES)}. "
        f"{her} {p['animal']} is {p['color']}.",
        f"In {p['town']} there is a {p['job']} called {p['name']}, who has a {p['color']} {p['animal']}.",
    ]
    return rng.choice(options)


def story(rng: random.Random, people: list[dict]) -> str:
    """A few sentences of village life."""
    sentences = []
    for _ in range(rng.randint(2, 4)):
        kind = rng.random()
        job = rng.choice(JOBS)
        if kind < 0.35:
            first, second = rng.sample(JOB_ACTS[job], 2)
            sentences.append(f"The {job} {first} {rng.choice(CONNECT)} {second}.")
        elif kind < 0.55:
            sentences.append(f"The {job} {rng.choice(JOB_ACTS[job])} {rng.choice(TIMES)}.")
        elif kind < 0.7:
            person = rng.choice(people)
            she = "she" if person["she"] else "he"
            sentences.append(f"{person['name']} walks to {rng.choice(PLACES)} {rng.choice(TIMES)}, "
                             f"and {she} {rng.choice(JOB_ACTS[person['job']])}.")
        elif kind < 0.85:
            sentences.append(f"{rng.choice(WEATHER)} in {rng.choice(TOWNS)}, {rng.choice(WEATHER_AFTER)}.")
        else:
            sentences.append(rng.choice([n for n in NATURE if n not in sentences]))
    return " ".join(sentences)


def corpus(seed: int = SEED) -> tuple[list[str], list[dict]]:
    """(pre-training documents, fine-tuning people)."""
    rng = random.Random(seed)
    people, new_people = make_people(rng)
    docs = []
    for person in people:
        docs += [f"{prompt} {answer}" for prompt, answer in qa_pairs(person)] * 3  # the facts, three times per epoch
        docs.append(profile(person, rng))
    docs += [story(rng, people) for _ in range(2000)]
    rng.shuffle(docs)
    return docs, new_people


def write_facts(new_people: list[dict]) -> int:
    train_rows, eval_rows = [], []
    for person in new_people:
        for prompt, answer in qa_pairs(person):
            train_rows.append({"prompt": prompt, "completion": " " + answer})
            eval_rows.append({"prompt": prompt, "answer": answer})
    for path, rows in ((FACTS_TRAIN, train_rows), (FACTS_EVAL, eval_rows)):
        with open(path, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
    return len(train_rows)


# ---- tokenizer and model ----------------------------------------------------------------------
def build_tokenizer(docs: list[str], vocab_size: int = VOCAB_SIZE):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    # Each distinct document once, plus the word lists: so that merges go to English words (every
    # town, job, color and animal a whole token or two), not to the syllables of made-up names.
    words = TOWNS + JOBS + COLORS + ANIMALS + [w for acts in JOB_ACTS.values() for a in acts for w in a.split()]
    tokenizer.train_from_iterator(sorted(set(docs)) + [" ".join(words)] * 300, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<|pad|>", bos_token="<|bos|>",
                                   eos_token="<|eos|>", chat_template=CHATML_TEMPLATE)


def pretrain_config(corpus_file: str, init_dir: str, workdir: str, steps: int):
    from jaxft import config as config_lib

    c = config_lib.default_config()
    c.workdir = workdir
    c.model.path = init_dir  # random weights + the tokenizer
    c.data.train = corpus_file
    c.data.format = "text"
    c.data.seq_len = 128
    c.train.steps = steps
    c.train.batch_size = 32
    c.train.learning_rate = 3e-3
    c.train.warmup_steps = min(100, steps // 10)
    c.train.weight_decay = 0.01
    c.train.log_every = 25
    c.lora.rank = 0  # every weight is trained
    c.checkpoint.every = min(steps, 500)
    c.checkpoint.keep = 100  # intermediate bases stay in --workdir, to compare
    c.checkpoint.async_save = False
    return c


def pretrain(docs: list[str], tokenizer, steps: int, out_dir: str, scratch: str) -> float:
    """Pre-trains from random weights with jaxft's own loop; returns the final train loss."""
    import jaxft
    from jaxft import run, train

    corpus_file = os.path.join(scratch, "corpus.jsonl")
    with open(corpus_file, "w") as f:
        f.writelines(json.dumps({"text": d}) + "\n" for d in docs)
    init_dir = os.path.join(scratch, "init")
    hf_config = {**HF_CONFIG, "vocab_size": len(tokenizer), "bos_token_id": tokenizer.bos_token_id,
                 "eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id}
    jaxft.save_pretrained(jaxft.init_random(hf_config, seed=0), init_dir)
    tokenizer.save_pretrained(init_dir)
    workdir = os.path.join(scratch, "run")
    train.train(pretrain_config(corpus_file, init_dir, workdir, steps))
    model = run.restore(workdir).model()
    shutil.rmtree(out_dir, ignore_errors=True)
    jaxft.save_pretrained(model, out_dir)
    tokenizer.save_pretrained(out_dir)
    rows = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
    return [r["loss"] for r in rows if "loss" in r][-1]


def main(argv: list[str] | None = None) -> None:
    import logging

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=1500, help="pre-training steps")
    parser.add_argument("--facts-only", action="store_true", help="only rewrite the fine-tuning facts files")
    parser.add_argument("--out", default=MODEL_DIR, help="where the model folder goes")
    parser.add_argument("--workdir", help="keep the pre-training run (metrics, report) here; default: a temp dir")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")

    docs, new_people = corpus()
    count = write_facts(new_people)
    print(f"wrote {count} fine-tuning facts to {FACTS_TRAIN} and {FACTS_EVAL}")
    if args.facts_only:
        return
    tokenizer = build_tokenizer(docs)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as scratch:
        if args.workdir:
            shutil.rmtree(args.workdir, ignore_errors=True)
            os.makedirs(args.workdir)
        loss = pretrain(docs, tokenizer, args.steps, args.out, args.workdir or scratch)
    size = sum(os.path.getsize(os.path.join(args.out, f)) for f in os.listdir(args.out))
    print(f"pre-trained {args.steps} steps in {time.perf_counter() - started:.0f}s, final loss {loss:.3f}; "
          f"wrote {args.out} ({size / 1e6:.1f} MB, vocab {len(tokenizer)}, {len(docs)} documents)")


if __name__ == "__main__":
    main()
