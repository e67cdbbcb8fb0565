"""Greedy generation matches transformers; the CLI's commands run end to end."""

import subprocess
import sys

import numpy as np
import pytest
import torch

import jaxft
from jaxft import cli
from jaxft.demo import MODEL_DIR
from jaxft.generate import greedy_generate
from jaxft.testing import tiny_hf_model


@pytest.mark.parametrize("case", ["llama3_rope", "qwen3"])
def test_greedy_generation_matches_transformers(tmp_path, case):
    folder, torch_model = tiny_hf_model(tmp_path, case)
    model = jaxft.from_pretrained(folder)
    prompts = [[5, 17, 42, 99, 3], [8, 1, 64]]  # different lengths: rows stop at their own ends
    got = greedy_generate(model, prompts, max_new_tokens=8)
    for prompt, continuation in zip(prompts, got):
        with torch.no_grad():
            expected = torch_model.generate(torch.tensor([prompt]), max_new_tokens=8, do_sample=False,
                                            eos_token_id=None, pad_token_id=0)[0, len(prompt):].tolist()
        assert continuation == expected


def test_generation_stops_at_eos(tmp_path):
    folder, _ = tiny_hf_model(tmp_path, "llama3_rope")
    model = jaxft.from_pretrained(folder)
    free = greedy_generate(model, [[5, 17, 42]], max_new_tokens=6)[0]
    eos = free[2]  # pretend the third generated token is EOS
    stopped = greedy_generate(model, [[5, 17, 42]], max_new_tokens=6, eos_id=eos)[0]
    assert stopped == free[: free.index(eos) + 1]


def test_demo_command_trains_reports_exports_and_reloads(tmp_path, capsys):
    workdir = tmp_path / "demo"
    assert cli.main(["demo", "--variant", "smoke", "--workdir", str(workdir), "--config.eval.max_new_tokens=2"]) == 0
    out = capsys.readouterr().out
    assert "with LoRA r8 for 4 steps" in out and "(step 4)" in out
    assert "before training: 0%" in out and "after training:" in out
    assert f"merged HF export: {workdir}/hf (reloaded: exact match" in out
    assert (workdir / "report.html").exists() and (workdir / "hf" / "model.safetensors").exists()


def test_info_and_generate_commands(capsys):
    assert cli.main(["info", "--model", MODEL_DIR]) == 0
    assert "family     llama: 4 layers" in capsys.readouterr().out
    assert cli.main(["generate", "--model", MODEL_DIR, "--prompt", "The river", "--max-new-tokens", "3"]) == 0
    assert capsys.readouterr().out.startswith("The river")


def test_console_script_is_installed():
    out = subprocess.run([sys.executable, "-m", "jaxft.cli", "--help"], capture_output=True, text=True, check=True)
    assert "demo" in out.stdout and "generate" in out.stdout


def test_bundled_demo_model_is_a_valid_hf_folder():
    import transformers

    hf_model = transformers.AutoModelForCausalLM.from_pretrained(MODEL_DIR, dtype=torch.float32)
    tokenizer = transformers.AutoTokenizer.from_pretrained(MODEL_DIR)
    ids = tokenizer("The river runs", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        expected = hf_model(ids).logits.numpy()
    got = np.asarray(jaxft.from_pretrained(MODEL_DIR)(ids.numpy()))
    assert np.abs(got - expected).max() <= 1e-4


def test_sampling_filters_and_is_reproducible(tmp_path):
    import jax
    import jax.numpy as jnp

    from jaxft.generate import generate, sample_logits

    logits = jnp.asarray([[0.0, 3.0, 1.0, 2.0]] * 2000)
    key = jax.random.key(0)
    top2 = np.asarray(sample_logits(logits, key, 1.0, top_k=2, top_p=1.0))
    assert set(top2.tolist()) == {1, 3}  # only the two best tokens
    nucleus = np.asarray(sample_logits(logits, key, 1.0, top_k=0, top_p=0.5))
    assert set(nucleus.tolist()) == {1}  # token 1 alone holds >= 50% of the mass
    free = np.asarray(sample_logits(logits, key, 1.0, top_k=0, top_p=1.0))
    assert set(free.tolist()) == {0, 1, 2, 3} and np.mean(free == 1) > np.mean(free == 3) > np.mean(free == 0)
    folder, _ = tiny_hf_model(tmp_path, "llama3_rope")
    model = jaxft.from_pretrained(folder)
    prompts = [[5, 17, 42], [8, 1]]
    assert generate(model, prompts, 6, temperature=0.8, top_p=0.9, seed=3) == \
        generate(model, prompts, 6, temperature=0.8, top_p=0.9, seed=3)
    assert generate(model, prompts, 6, temperature=1.0, top_k=1, seed=5) == greedy_generate(model, prompts, 6)


def test_chat_generation_uses_the_chat_template():
    import transformers

    from jaxft.generate import chat_prompt

    tokenizer = transformers.AutoTokenizer.from_pretrained(MODEL_DIR)
    ids = chat_prompt(tokenizer, [{"role": "user", "content": "Hello"}])
    assert tokenizer.decode(ids) == "<|im_start|>user\nHello<|im_end|>\n<|im_start|>assistant\n"
    assert cli.main(["generate", "--model", MODEL_DIR, "--prompt", "Hello", "--prompt", "Where is the mill?", "--chat",
                     "--max-new-tokens", "3"]) == 0


def test_prompts_start_as_training_documents_do():
    from transformers import AutoTokenizer

    from jaxft.generate import prompt_ids
    from jaxft.testing_families import word_tokenizer

    with_bos = word_tokenizer(["the", "river", "runs"])  # its post-processor prepends [BOS], as Llama's does
    assert prompt_ids(with_bos, "the river") == [with_bos.bos_token_id, 2, 3]
    no_bos = AutoTokenizer.from_pretrained(MODEL_DIR)  # the demo's BPE adds nothing
    assert prompt_ids(no_bos, "The river") == no_bos("The river")["input_ids"]
