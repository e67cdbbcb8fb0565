"""lm-evaluation-harness on jaxft models: a run's workdir (adapters unmerged, any kind) or an HF folder.

    jaxft eval --workdir runs/a --lm-eval hellaswag,gsm8k --limit 200
    jaxft eval --model path/to/hf --lm-eval my_task --lm-eval-include my_tasks/

`JaxftLM` is an lm-eval `TemplateLM`: lm-eval's own code splits (context, continuation) into tokens
and builds the rolling windows, exactly as for its `hf` model; jaxft only scores token ids and
generates. So the requests a task makes tokenize as they do for `hf`, and the numbers agree with
`lm_eval --model hf` on the exported folder (tests/test_harness.py). Scoring runs in batches of
`batch_size` rows padded to a power-of-two length (one compile per length bucket), sharded over the
mesh's data axes; `generate_until` uses the KV-cache generator (jaxft.generate), greedy or sampled as
the task's generation kwargs ask, cut at the task's stop strings as lm-eval cuts them.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from lm_eval.api.model import TemplateLM
from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs, postprocess_generated_text
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

from jaxft import losses, sharding

log = logging.getLogger(__name__)

DEFAULT_MAX_LENGTH = 2048  # lm-eval's default where neither config nor tokenizer names one
SAMPLING_KEYS = {"do_sample", "temperature", "top_k", "top_p", "seed"}


def _bucket(length: int, cap: int) -> int:
    """The padded length of a batch: the next power of two ≥ 16, at most `cap`."""
    return min(max(16, 1 << (length - 1).bit_length()), max(cap, length))


@nnx.jit
def _score(model, batch):
    """Per row: Σ log p(continuation) and whether every continuation token is the argmax."""
    logits = losses.forward(model, batch)
    weights = batch["weights"]
    log_probs = losses.token_log_probs(logits, batch["targets"])
    greedy = (jnp.argmax(logits, axis=-1) == batch["targets"]) | (weights == 0)
    return (log_probs * weights).sum(-1), greedy.all(-1)


class JaxftLM(TemplateLM):
    """An lm-eval model over a jaxft model (any nnx causal LM with adapters attached or merged)."""

    def __init__(self, model, tokenizer, mesh, *, batch_size: int = 16, max_length: int | None = None,
                 max_gen_toks: int = 256, add_bos_token: bool | None = None, seed: int = 0, hf_config=None):
        super().__init__()
        if jax.process_count() > 1:
            raise ValueError("jaxft eval --lm-eval runs on one host (lm-eval splits requests by rank; run it "
                             f"on one process, not {jax.process_count()})")
        self.model, self.tokenizer, self.mesh = model, tokenizer, mesh
        parallel = sharding.data_parallel_size(mesh)
        self.batch_size = -(-batch_size // parallel) * parallel  # whole rows per data shard
        self._max_length = max_length or _max_length(hf_config, tokenizer)
        self.max_gen_toks, self.add_bos_token, self.seed = max_gen_toks, add_bos_token, seed
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

    # ---- tokens, as lm-eval's hf model makes them ------------------------------------------------
    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        bos = self.tokenizer.bos_token_id
        return bos if bos is not None else self.tokenizer.eos_token_id

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def tokenizer_name(self) -> str:
        return self.tokenizer.name_or_path.replace("/", "__")

    def _special_tokens(self, string: str, add_special_tokens: bool | None) -> dict:
        if add_special_tokens is not None:
            return {"add_special_tokens": add_special_tokens}
        bos = self.tokenizer.bos_token
        if bos and string.startswith(bos):  # the text holds BOS already (a chat template wrote it)
            return {"add_special_tokens": False}
        return {} if self.add_bos_token is None else {"add_special_tokens": self.add_bos_token}

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        return self.tokenizer.encode(string, **self._special_tokens(string, add_special_tokens))

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        return self.tokenizer.apply_chat_template(chat_history, tokenize=False, add_generation_prompt=add_generation_prompt,
                                                  continue_final_message=not add_generation_prompt)

    # ---- scoring ---------------------------------------------------------------------------------
    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        """(Σ log p(continuation | context), greedy?) per (key, context ids, continuation ids), the
        pair left-truncated to max_length + 1 tokens as lm-eval's hf model does."""
        rows = []
        for _, context, continuation in requests:
            if not context or not continuation:
                raise ValueError(f"lm-eval request with an empty context or continuation: {context}, {continuation}")
            rows.append(((context + continuation)[-(self.max_length + 1):], len(continuation)))
        order = sorted(range(len(rows)), key=lambda i: -len(rows[i][0]))  # similar lengths share a batch
        results: list[Any] = [None] * len(rows)
        for start in range(0, len(order), self.batch_size):
            chosen = order[start:start + self.batch_size]
            length = _bucket(len(rows[chosen[0]][0]) - 1, self.max_length)
            batch = {k: np.zeros((self.batch_size, length), np.int32) for k in ("input_ids", "attention_mask", "targets")}
            batch["weights"] = np.zeros((self.batch_size, length), np.float32)
            for slot, index in enumerate(chosen):
                tokens, continuation = rows[index]
                n = len(tokens) - 1
                batch["input_ids"][slot, :n] = tokens[:-1]
                batch["attention_mask"][slot, :n] = 1
                batch["targets"][slot, :n] = tokens[1:]
                batch["weights"][slot, n - continuation:n] = 1.0
            with sharding.activate(self.mesh):
                sums, greedy = _score(self.model, sharding.global_batch(batch, self.mesh))
            sums, greedy = np.asarray(sums, np.float64), np.asarray(greedy)
            for slot, index in enumerate(chosen):
                results[index] = (float(sums[slot]), bool(greedy[slot]))
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Σ log p over the whole text, in disjoint windows of max_length tokens (lm-eval's own windows)."""
        windows, owners = [], []
        for index, (string,) in enumerate(req.args for req in requests):
            for context, continuation in map(make_disjoint_window, get_rolling_token_windows(
                    token_list=self.tok_encode(string), prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length, context_len=1)):
                windows.append((None, context, continuation))
                owners.append(index)
        totals = [0.0] * len(requests)
        for owner, (log_prob, _) in zip(owners, self._loglikelihood_tokens(windows)):
            totals[owner] += log_prob
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    # ---- generation ------------------------------------------------------------------------------
    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        from jaxft.generate import generate

        groups: dict[str, list[int]] = {}
        for index, req in enumerate(requests):  # one set of generation kwargs per batch
            groups.setdefault(json.dumps(req.args[1], sort_keys=True, default=str), []).append(index)
        eos = self.tokenizer.decode([self.eot_token_id], skip_special_tokens=False)
        out: list[Any] = [None] * len(requests)
        for indices in groups.values():
            kwargs = normalize_gen_kwargs(requests[indices[0]].args[1], self.max_gen_toks)
            until = handle_stop_sequences(kwargs.pop("until", None), eos=eos)
            max_new = kwargs.pop("max_gen_toks")
            sampling = _sampling(kwargs, self.seed)
            budget = self.max_length - max_new
            if budget <= 0:
                raise ValueError(f"lm-eval asks for {max_new} new tokens, not below max_length {self.max_length}")
            prompts = {i: self.tok_encode(requests[i].args[0])[-budget:] for i in indices}
            ordered = sorted(indices, key=lambda i: -len(prompts[i]))
            for start in range(0, len(ordered), self.batch_size):
                chosen = ordered[start:start + self.batch_size]
                batch = [prompts[i] for i in chosen]
                batch += [batch[-1]] * (self.batch_size - len(batch))  # one compiled shape per length
                with sharding.activate(self.mesh):
                    completions = generate(self.model, batch, max_new, eos_id=self.eot_token_id, pad_id=self.pad_id,
                                           pad_to=_bucket(len(batch[0]), budget), **sampling)
                for i, ids in zip(chosen, completions):
                    text = self.tokenizer.decode(ids, skip_special_tokens=True)
                    out[i] = postprocess_generated_text(text, until, None)
                    self.cache_hook.add_partial("generate_until", requests[i].args, out[i])
        return out


def _sampling(kwargs: dict, seed: int) -> dict:
    """lm-eval generation kwargs → jaxft.generate's: greedy unless do_sample; others refused by name."""
    unknown = sorted(set(kwargs) - SAMPLING_KEYS)
    if unknown:
        log.warning("lm-eval generation kwargs that jaxft's generator does not apply, ignored: %s", unknown)
    if not kwargs.get("do_sample"):
        return {"temperature": 0.0, "seed": seed}
    return {"temperature": float(kwargs.get("temperature") or 1.0), "top_k": int(kwargs.get("top_k") or 0),
            "top_p": float(kwargs.get("top_p") or 1.0), "seed": int(kwargs.get("seed", seed))}


def _max_length(hf_config: dict | None, tokenizer) -> int:
    """As lm-eval's hf model resolves it: the config's n_positions / max_position_embeddings / n_ctx,
    else the tokenizer's model_max_length when set, else 2048."""
    for key in ("n_positions", "max_position_embeddings", "n_ctx"):
        if (hf_config or {}).get(key) is not None:
            return int(hf_config[key])
    limit = getattr(tokenizer, "model_max_length", None)
    return int(limit) if limit is not None and limit < 10**12 else DEFAULT_MAX_LENGTH


def evaluate(lm: JaxftLM, tasks: list[str], *, include: str | None = None, limit: float | None = None,
             num_fewshot: int | None = None, apply_chat_template: bool = False, out_dir: str | None = None,
             seed: int = 0) -> dict:
    """lm_eval.simple_evaluate with `lm`; results (and each request's samples) as JSON in `out_dir`."""
    import lm_eval
    from lm_eval.tasks import TaskManager
    from lm_eval.utils import handle_non_serializable

    results = lm_eval.simple_evaluate(model=lm, tasks=tasks, task_manager=TaskManager(include_path=include),
                                      limit=limit, num_fewshot=num_fewshot, log_samples=True, bootstrap_iters=0,
                                      apply_chat_template=apply_chat_template, random_seed=seed,
                                      numpy_random_seed=seed, torch_random_seed=seed, fewshot_random_seed=seed)
    if out_dir:
        os.makedirs(out_dir, exist_ok=True)
        samples = results.pop("samples", {})
        with open(os.path.join(out_dir, "results.json"), "w") as f:
            json.dump(results, f, indent=2, default=handle_non_serializable)
        for task, rows in samples.items():
            with open(os.path.join(out_dir, f"samples_{task}.jsonl"), "w") as f:
                for row in rows:
                    f.write(json.dumps(row, default=handle_non_serializable) + "\n")
        results["samples"] = samples
    return results


def summary_table(results: dict) -> list[dict]:
    """[{task, metric, value, stderr, samples}] from lm-eval results: what the report and the CLI show."""
    rows = []
    for task, metrics in results.get("results", {}).items():
        for key, value in metrics.items():
            if "," not in key or key.startswith("alias") or "_stderr" in key or not isinstance(value, (int, float)):
                continue
            metric, filter_name = key.split(",", 1)
            stderr = metrics.get(f"{metric}_stderr,{filter_name}")
            rows.append({"task": task, "metric": metric, "filter": filter_name, "value": float(value),
                         "stderr": stderr if isinstance(stderr, (int, float)) else None,
                         "samples": (results.get("n-samples", {}).get(task) or {}).get("effective")})
    return rows
