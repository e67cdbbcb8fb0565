"""Logits parity of each family on the default JAX backend: fp32 and bf16 against transformers.

    python benchmarks/family_parity.py                       # every family, on the first accelerator
    python benchmarks/family_parity.py --cases llama3_rope gemma2_softcap --out parity.json

The accelerator side of tests/models/test_llama_parity.py and test_family_parity.py: the same tiny
random transformers models (jaxft.testing, jaxft.testing_families) and padded batch, the reference
run by torch in float32 on the CPU. jaxft runs on whatever JAX sees first, three ways: float32 at
the backend's default matmul precision (GPUs may use TF32 for float32 dots), float32 at "highest",
and bfloat16 params and compute. Reports, per case, the max |jaxft - transformers| over real tokens
and the relative error ‖jaxft - ref‖ / ‖ref‖; `tolerance_fp32` is the CPU tests' 1e-4.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import emit  # noqa: E402

# One case per family (and the mixed-window ones that fused attention must get right).
CASES = ["llama3_rope", "mistral_sliding", "qwen2_yarn_sliding", "qwen3", "gemma", "gemma2_softcap", "gemma3_text",
         "phi3_longrope"]
LENGTH = 40  # longer than every tiny model's sliding window (jaxft.testing_families.LONG)
TOLERANCE_FP32 = 1e-4


def case_model(folder: str, case: str):
    from jaxft.testing import CASES as LLAMA_CASES
    from jaxft.testing import tiny_hf_model
    from jaxft.testing_families import FAMILY_CASES, tiny_family_model

    if case in FAMILY_CASES:
        return tiny_family_model(folder, case)
    if case in LLAMA_CASES:
        return tiny_hf_model(folder, case)
    raise SystemExit(f"unknown case {case!r}: choose from {sorted(FAMILY_CASES) + sorted(LLAMA_CASES)}")


def errors(got, want, mask) -> dict:
    real = np.asarray(mask).astype(bool)
    diff = (np.asarray(got, np.float64) - want)[real]
    return {"max_abs": float(np.abs(diff).max()), "relative": float(np.linalg.norm(diff) / np.linalg.norm(want[real]))}


def run_case(case: str, folder: str) -> dict:
    import jax
    import jax.numpy as jnp

    import jaxft
    from jaxft.testing import padded_batch, torch_logits

    _, torch_model = case_model(folder, case)
    ids, mask, positions = padded_batch(torch_model.config.vocab_size, batch=3, length=LENGTH)
    want = torch_logits(torch_model, ids, mask, positions).astype(np.float64)
    out = {"case": case, "model_type": torch_model.config.model_type}
    for name, dtype, precision in (("fp32", "float32", None), ("fp32_highest", "float32", "highest"),
                                   ("bf16", "bfloat16", None)):
        model = jaxft.from_pretrained(folder, dtype=dtype)
        forward = jax.jit(lambda ids, mask: model(ids, attention_mask=mask))
        if precision:
            with jax.default_matmul_precision(precision):
                got = forward(jnp.asarray(ids), jnp.asarray(mask))
        else:
            got = forward(jnp.asarray(ids), jnp.asarray(mask))
        out[name] = errors(got, want, mask)
    out["fp32_within_tolerance"] = out["fp32_highest"]["max_abs"] <= TOLERANCE_FP32
    return out


def run(args) -> dict:
    import jax

    started = time.perf_counter()
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for case in args.cases:
            try:
                results.append(run_case(case, os.path.join(tmp, case)))
            except Exception as e:  # noqa: BLE001 - one family's failure is a result, not the end of the run
                results.append({"case": case, "error": f"{type(e).__name__}: {e}"[:2000]})
    ok = [r for r in results if "error" not in r]
    return {
        "benchmark": "family_parity", "date": time.strftime("%Y-%m-%d"), "device": jax.devices()[0].device_kind,
        "backend": jax.default_backend(), "jax_version": jax.__version__, "length": LENGTH,
        "tolerance_fp32": TOLERANCE_FP32, "cases": results,
        "worst_fp32_max_abs": max((r["fp32"]["max_abs"] for r in ok), default=None),
        "worst_fp32_highest_max_abs": max((r["fp32_highest"]["max_abs"] for r in ok), default=None),
        "worst_bf16_max_abs": max((r["bf16"]["max_abs"] for r in ok), default=None),
        "worst_bf16_relative": max((r["bf16"]["relative"] for r in ok), default=None),
        "all_fp32_within_tolerance": bool(ok) and len(ok) == len(results) and all(r["fp32_within_tolerance"] for r in ok),
        "seconds": time.perf_counter() - started,
    }


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--cases", nargs="+", default=CASES)
    p.add_argument("--out", help="also write the JSON here")
    args = p.parse_args(argv)
    return emit(run(args), args.out)


if __name__ == "__main__":
    main()
