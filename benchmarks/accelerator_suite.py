"""Every accelerator figure from one call, inside a time budget.

    bash benchmarks/wheels.sh && python3 benchmarks/accelerator_suite.py --budget 540   # on the accelerator
    python benchmarks/accelerator_suite.py --smoke                                      # CI: tiny presets, CPU

Parts, in order, each in its own subprocess with its own timeout (a hang costs that part, not the
budget), each skipped with a note once the budget left is under what it needs:
  1. attention_tests  the fused-attention tests (cuDNN) on this backend: pytest with JAXFT_TEST_BACKEND
  2. parity           each family's logits vs transformers, fp32 and bf16 (benchmarks/family_parity.py)
  3. full_ft_1b       compare: full FT, Llama-3.2-1B shape, seq 2048, after a short sweep of remat,
     lora_8b          micro-batch, loss chunk and attention; LoRA r16 all-linear on Llama-3.1-8B
  4. qlora_8b         QLoRA NF4 on the 8B shape: peak device memory at seq 2048, batch 1
  5. profile          jax.profiler trace of the best full-FT step: the top ops by time, as a table
Each part's JSON goes to --results-dir (benchmarks/results/) and $OUT when set, with the suite's
own JSON (every part's status and the goals); then it prints the summary against the goals and
regenerates benchmarks/README.md. The parent process never imports jax: it would take the GPU's
memory from the parts. Wheels in .whl/ (benchmarks/wheels.sh) are installed first when present.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import glob
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
GIB = 2**30

# The goals (issue 8 and 19), each checked from one part's JSON.
GOALS = {"full_ft_1b": "MFU >= 55%", "lora_8b": ">= 2.5x HF PEFT tok/s at <= 1.0x its peak memory",
         "qlora_8b": "peak memory <= 16 GiB"}


def sweep_settings(smoke: bool) -> dict:
    """Per goal workload: the fixed flags, the baseline's flags, and the sweep's candidates (remat,
    micro-batch, loss chunk, attention) in the order they are tried, the likeliest best first, so a
    budget that runs out early still has the best guess."""
    if smoke:
        common = ["--preset", "tiny", "--seq", "64", "--steps", "2", "--warmup", "1"]
        return {
            # On CPU "auto" is "xla": the second trial is the first's program, a compile-cache hit,
            # so the smoke run exercises the sweep for the price of one compile.
            "full_ft_1b": {"flags": common + ["--mode", "full"], "baseline": ["--batch", "2", "--remat", "none"],
                           "candidates": [("none", 2, 0, "auto"), ("none", 2, 0, "xla")], "trial_s": 240},
            "lora_8b": {"flags": common + ["--mode", "lora", "--rank", "4"], "baseline": ["--batch", "2", "--remat", "none"],
                        "candidates": [("none", 2, 0, "auto")], "trial_s": 240},
            "qlora_8b": common + ["--mode", "lora", "--rank", "4", "--quantize", "nf4", "--batch", "1", "--remat", "full"],
        }
    common = ["--seq", "2048", "--steps", "5", "--warmup", "2", "--param-dtype", "bfloat16",
              "--compute-dtype", "bfloat16"]
    return {
        # 1B: everything fits in 139 GB without remat; the sweep checks whether a bigger micro-batch
        # under a cheap remat policy, or XLA's own attention, beats it.
        "full_ft_1b": {"flags": ["--preset", "llama3.2-1b", "--mode", "full", *common],
                       "baseline": ["--batch", "8", "--remat", "none"],
                       "candidates": [("none", 8, 0, "cudnn"), ("dots_no_batch", 16, 512, "cudnn"),
                                      ("none", 8, 0, "xla"), ("full", 16, 512, "cudnn")], "trial_s": 75},
        # 8B LoRA: HF PEFT at batch 4 with gradient checkpointing is the baseline (its memory is
        # the bar); jaxft tries remat policies that trade memory for speed.
        "lora_8b": {"flags": ["--preset", "llama3.1-8b", "--mode", "lora", "--rank", "16", *common],
                    "baseline": ["--batch", "4", "--remat", "full"],
                    "candidates": [("full", 4, 512, "cudnn"), ("dots_no_batch", 4, 512, "cudnn"),
                                   ("full", 8, 512, "cudnn")], "trial_s": 110},
        "qlora_8b": ["--preset", "llama3.1-8b", "--mode", "lora", "--rank", "16", "--quantize", "nf4", "--batch", "1",
                     "--remat", "full", "--loss-chunk", "512", *common[:2], "--steps", "3", "--warmup", "1"],
    }


# Planned seconds per part (the most it may take) and the least worth starting with.
# A part never takes time that the parts after it need at the least (their second figure).
PLAN = {"attention_tests": (50, 20), "parity": (60, 25), "full_ft_1b": (160, 60), "lora_8b": (180, 90),
        "qlora_8b": (90, 45), "profile": (60, 30)}
# The smoke run only proves that every part runs: generous limits for a busy CI machine.
SMOKE_PLAN = {"attention_tests": (300, 5), "parity": (300, 5), "full_ft_1b": (600, 5), "lora_8b": (500, 5),
              "qlora_8b": (300, 5), "profile": (300, 5)}


class Runner:
    """Subprocesses under one deadline: each gets min(its own timeout, the time left)."""

    def __init__(self, budget: float, env: dict, log):
        self.deadline = time.monotonic() + budget
        self.env, self.log = env, log

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def run(self, argv: list[str], timeout: float, env: dict | None = None) -> tuple[int | None, str, str, float]:
        """(returncode or None when killed at its timeout, stdout, stderr, seconds). The child gets its
        own process group, so that a timeout ends everything it started."""
        timeout = max(1.0, min(timeout, self.left()))
        started = time.monotonic()
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
                                env={**self.env, **(env or {})}, start_new_session=True)
        try:
            out, err = proc.communicate(timeout=timeout)
            code = proc.returncode
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            out, err = proc.communicate()
            code = None
        seconds = time.monotonic() - started
        self.log(f"    {' '.join(os.path.basename(a) if a == sys.executable else a for a in argv)[:150]}"
                 f" -> {'timeout' if code is None else code} in {seconds:.0f} s")
        return code, out, err, seconds

    def run_json(self, script: str, argv: list[str], timeout: float) -> dict:
        code, out, err, seconds = self.run([sys.executable, os.path.join(HERE, script), *argv], timeout)
        if code is None:
            return {"error": f"timed out after {seconds:.0f} s", "timed_out": True, "stderr_tail": err[-1500:]}
        if code:
            return {"error": f"exit {code}", "stderr_tail": err[-1500:]}
        return json.loads(out[out.index("{"):])


# --- the parts ---------------------------------------------------------------------------------------
def part_attention_tests(runner: Runner, args, time_left: float) -> dict:
    backend = "cpu" if args.smoke else args.backend
    with tempfile.TemporaryDirectory() as tmp:
        report = os.path.join(tmp, "junit.xml")
        argv = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/models/test_attention_impls.py",
                "-k", "cudnn", f"--junitxml={report}"]
        code, out, err, seconds = runner.run(argv, time_left, env={"JAXFT_TEST_BACKEND": backend})
        counts = junit_counts(report) if os.path.exists(report) else {}
    result = {"benchmark": "attention_tests", "date": time.strftime("%Y-%m-%d"), "backend": backend,
              "command": f"JAXFT_TEST_BACKEND={backend} python -m pytest tests/models/test_attention_impls.py -k cudnn",
              "returncode": code, "seconds": seconds, **counts, "output_tail": (out + err)[-1500:]}
    if code is None:
        result["error"] = f"timed out after {seconds:.0f} s"
    elif code not in (0, 5) or counts.get("failed") or counts.get("errors"):
        result["error"] = f"pytest exit {code}: {counts.get('failed', '?')} failed"
    return result


def junit_counts(path: str) -> dict:
    import xml.etree.ElementTree as ET

    cases = list(ET.parse(path).getroot().iter("testcase"))
    failed = [c for c in cases if c.find("failure") is not None]
    errors = [c for c in cases if c.find("error") is not None]
    skipped = [c for c in cases if c.find("skipped") is not None]
    return {"tests": len(cases), "passed": len(cases) - len(failed) - len(errors) - len(skipped),
            "failed": len(failed), "errors": len(errors), "skipped": len(skipped),
            "failures": [c.get("name") for c in failed + errors][:20]}


def part_parity(runner: Runner, args, time_left: float) -> dict:
    cases = ["llama3_rope"] if args.smoke else []
    return runner.run_json("family_parity.py", ["--cases", *cases] if cases else [], time_left)


def trial_flags(candidate) -> list[str]:
    remat, batch, chunk, attention = candidate
    return ["--remat", remat, "--batch", str(batch), "--loss-chunk", str(chunk), "--attention", attention]


def part_compare(name: str, runner: Runner, args, time_left: float) -> dict:
    """The baseline first (its figures are the bar), then the sweep's candidates while time is left;
    the best trial is the jaxft side of the compare JSON, every trial is kept in `sweep`."""
    from compare import combine

    spec = sweep_settings(args.smoke)[name]
    part_end = time.monotonic() + time_left
    baseline = runner.run_json("hf_peft_baseline.py", spec["flags"] + spec["baseline"], min(spec["trial_s"], time_left))
    trials = []
    for candidate in spec["candidates"]:
        left = part_end - time.monotonic()
        if trials and left < spec["trial_s"] / 3:  # too little to compile and time another
            trials.append({"settings": trial_flags(candidate), "skipped": f"{left:.0f} s left in this part"})
            continue
        result = runner.run_json("train_throughput.py", spec["flags"] + trial_flags(candidate),
                                 min(spec["trial_s"], max(left, 1.0)))
        trials.append({"settings": trial_flags(candidate), **result})
    best = pick_best(name, [t for t in trials if "tokens_per_second" in t], baseline)
    out = combine(best or {"error": "no sweep trial finished"}, baseline)
    out["sweep"] = [{k: t.get(k) for k in ("settings", "tokens_per_second", "mfu", "peak_memory_bytes",
                                           "compile_seconds", "error", "skipped") if k in t} for t in trials]
    out["workload"] = name
    if best:
        out["best_settings"] = best["settings"]
    for side in ("jaxft", "transformers_peft"):
        if "error" in out[side]:
            out["error"] = f"{side}: {out[side]['error']}"
            out["timed_out"] = bool(out[side].get("timed_out"))
    return out


def pick_best(name: str, trials: list[dict], baseline: dict) -> dict | None:
    """full FT: the highest MFU (tokens/s where no MFU is known). LoRA: the fastest trial within the
    baseline's peak memory, when any is; else the fastest."""
    if not trials:
        return None
    if name == "lora_8b" and baseline.get("peak_memory_bytes"):
        within = [t for t in trials if t.get("peak_memory_bytes") and t["peak_memory_bytes"] <= baseline["peak_memory_bytes"]]
        trials = within or trials
    return max(trials, key=lambda t: (t.get("mfu") or 0.0, t["tokens_per_second"]))


def part_qlora(runner: Runner, args, time_left: float) -> dict:
    result = runner.run_json("train_throughput.py", sweep_settings(args.smoke)["qlora_8b"], time_left)
    if "error" not in result:
        compiled = (result.get("compiled_memory") or {}).get("peak_bytes")
        # The allocator's high-water mark where the backend keeps one (GPU, TPU); XLA's buffer plan on CPU.
        result["peak_memory_measured_bytes"] = result.get("peak_memory_bytes") or compiled
        result["peak_memory_source"] = "allocator" if result.get("peak_memory_bytes") else "compiled_memory_analysis"
    return result


def part_profile(runner: Runner, args, time_left: float, best_full: dict | None) -> dict:
    spec = sweep_settings(args.smoke)["full_ft_1b"]
    settings = (best_full or {}).get("best_settings") or trial_flags(spec["candidates"][0])
    with tempfile.TemporaryDirectory() as trace:
        flags = [*spec["flags"], *settings, "--steps", "2", "--warmup", "1", "--profile", trace, "--profile-steps", "3"]
        result = runner.run_json("train_throughput.py", flags, time_left)
    if "error" in result:
        return {"benchmark": "profile", **result}
    profile = result.pop("profile")
    return {"benchmark": "profile", "date": result["date"], "device": result["device"], "settings": settings,
            "step_seconds": result["step_seconds"], "mfu": result.get("mfu"), **profile}


# --- goals, files, summary --------------------------------------------------------------------------
def goals(parts: dict) -> list[dict]:
    full = (parts.get("full_ft_1b") or {}).get("result") or {}
    lora = (parts.get("lora_8b") or {}).get("result") or {}
    qlora = (parts.get("qlora_8b") or {}).get("result") or {}
    mfu = (full.get("jaxft") or {}).get("mfu")
    speed, memory = (lora.get("ratios") or {}).get("tokens_per_second"), (lora.get("ratios") or {}).get("peak_memory")
    peak = qlora.get("peak_memory_measured_bytes")
    return [
        {"part": "full_ft_1b", "goal": GOALS["full_ft_1b"], "value": None if mfu is None else f"{mfu:.1%}",
         "met": None if mfu is None else mfu >= 0.55},
        {"part": "lora_8b", "goal": GOALS["lora_8b"],
         "value": None if speed is None else f"{speed:.2f}x tok/s, " + ("memory ?" if memory is None else f"{memory:.2f}x memory"),
         "met": None if speed is None or memory is None else bool(speed >= 2.5 and memory <= 1.0)},
        {"part": "qlora_8b", "goal": GOALS["qlora_8b"], "value": None if peak is None else f"{peak / GIB:.3f} GiB",
         "met": None if peak is None else peak <= 16 * GIB},
    ]


def summary_table(suite: dict) -> str:
    lines = [f"accelerator suite on {suite['device']} ({suite['backend']}{', smoke' if suite['smoke'] else ''}): "
             f"{suite['elapsed_seconds']:.0f} s of {suite['budget_seconds']:.0f} s",
             "| part | status | s | figure |", "|---|---|---|---|"]
    for name, part in suite["parts"].items():
        lines.append(f"| {name} | {part['status']} | {part.get('seconds', 0):.0f} | {part_figure(name, part)} |")
    lines += ["", "| goal | value | met |", "|---|---|---|"]
    for g in suite["goals"]:
        met = "n/a (smoke)" if suite["smoke"] else {True: "yes", False: "NO", None: "not measured"}[g["met"]]
        lines.append(f"| {g['part']}: {g['goal']} | {g['value'] or '-'} | {met} |")
    return "\n".join(lines)


def part_figure(name: str, part: dict) -> str:
    r = part.get("result") or {}
    if part["status"] != "ok":
        return (part.get("note") or r.get("error") or "")[:90].replace("\n", " ").replace("|", "/")
    if name == "attention_tests":
        return f"{r.get('passed')} passed, {r.get('failed')} failed, {r.get('skipped')} skipped"
    if name == "parity":
        worst = r.get("worst_bf16_relative")
        return (f"{len(r['cases'])} cases; fp32 worst {r['worst_fp32_max_abs']:.1e} (highest {r['worst_fp32_highest_max_abs']:.1e});"
                f" bf16 worst {r['worst_bf16_max_abs']:.2e} abs, {worst:.1e} rel") if worst is not None else "no case ran"
    if name in ("full_ft_1b", "lora_8b"):
        j, ratios = r.get("jaxft") or {}, r.get("ratios") or {}
        mfu = f", MFU {j['mfu']:.1%}" if j.get("mfu") else ""
        speed, memory = ratios.get("tokens_per_second"), ratios.get("peak_memory")
        return (f"{' '.join(r.get('best_settings') or [])}: {j.get('tokens_per_second', 0):,.0f} tok/s{mfu}; "
                + ("no HF ratio" if speed is None else f"x{speed:.2f} HF tok/s")
                + (", memory ratio n/a" if memory is None else f", x{memory:.2f} HF memory"))
    if name == "qlora_8b":
        return f"peak {r['peak_memory_measured_bytes'] / GIB:.3f} GiB ({r['peak_memory_source']}), {r['tokens_per_second']:,.0f} tok/s"
    if name == "profile":
        top = (r.get("ops") or [{}])[0]
        return f"top op {top.get('op')} {top.get('share', 0):.0%} of {r.get('total_ms', 0):.0f} ms"
    return ""


def slug(device: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in device.lower()).strip("-") or "unknown"


def install_wheels(log) -> str | None:
    """pip-installs .whl/*.whl (what the device image lacks, benchmarks/wheels.sh) into a folder the
    parts find on PYTHONPATH; None when there is no wheelhouse."""
    wheels = sorted(glob.glob(os.path.join(ROOT, ".whl", "*.whl")))
    if not wheels:
        return None
    target = os.path.join(tempfile.gettempdir(), "jaxft-suite-site")
    code = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                           "--no-cache-dir", "--upgrade", "--target", target, *wheels]).returncode
    log(f"installed {len(wheels)} wheels into {target}" if code == 0 else f"pip install of .whl/ failed ({code})")
    return target if code == 0 else None


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--budget", type=float, default=540.0, help="seconds for everything (default 540)")
    p.add_argument("--smoke", action="store_true", help="tiny presets on CPU: checks that every part runs")
    p.add_argument("--backend", default="cuda", help="JAX platform for the attention tests (JAXFT_TEST_BACKEND)")
    p.add_argument("--results-dir", help="where the JSONs go (default benchmarks/results; with --smoke a temp dir)")
    p.add_argument("--readme", help="README to regenerate (default benchmarks/README.md; with --smoke, "
                                    "README.md in the results dir)")
    p.add_argument("--parts", nargs="+", choices=list(PLAN), default=list(PLAN), help="run only these parts")
    p.add_argument("--jobs", type=int, help="parts run at once (default 1; 2 with --smoke, whose parts share no chip)")
    p.add_argument("--compile-cache", help="JAX persistent compilation cache folder (default: a fresh one per run)")
    p.add_argument("--no-wheels", action="store_true", help="do not install .whl/ even when present")
    args = p.parse_args(argv)
    args.jobs = args.jobs or (2 if args.smoke else 1)
    started = time.monotonic()
    results_dir = args.results_dir or (tempfile.mkdtemp(prefix="jaxft-suite-") if args.smoke
                                       else os.path.join(HERE, "results"))
    os.makedirs(results_dir, exist_ok=True)
    out_dir = os.environ.get("OUT")
    log_lines = []

    def log(message: str):
        print(message, flush=True)
        log_lines.append(message)

    site = None if (args.smoke or args.no_wheels) else install_wheels(log)
    env = dict(os.environ, PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1",
               PYTHONPATH=os.pathsep.join(x for x in (ROOT, site, os.environ.get("PYTHONPATH")) if x))
    if args.smoke:
        env.update(JAX_PLATFORMS="cpu", CUDA_VISIBLE_DEVICES="")
    # One persistent compilation cache for every part: the profile re-runs the best full-FT trial's
    # program, and equal programs across trials (and each model's init) compile once.
    cache = args.compile_cache or tempfile.mkdtemp(prefix="jaxft-jax-cache-")
    env.update(JAX_COMPILATION_CACHE_DIR=cache, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
               JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
    runner = Runner(args.budget - (time.monotonic() - started), env, log)
    log(f"budget {args.budget:.0f} s; results -> {results_dir}")

    plan = SMOKE_PLAN if args.smoke else PLAN
    parts: dict[str, dict] = {}
    calls = {"attention_tests": part_attention_tests, "parity": part_parity,
             "full_ft_1b": lambda r, a, t: part_compare("full_ft_1b", r, a, t),
             "lora_8b": lambda r, a, t: part_compare("lora_8b", r, a, t), "qlora_8b": part_qlora,
             "profile": lambda r, a, t: part_profile(r, a, t, (parts.get("full_ft_1b") or {}).get("result"))}
    done = {name: threading.Event() for name in PLAN}

    def run_part(name: str) -> None:
        try:
            parts[name] = one_part(name)
        finally:
            done[name].set()

    def one_part(name: str) -> dict:
        most, least = plan[name]
        if name not in args.parts:
            return {"status": "skipped", "note": "not in --parts"}
        if name == "profile":  # profiles the full-FT sweep's best settings
            done["full_ft_1b"].wait()
        later = list(PLAN)[list(PLAN).index(name) + 1:]
        reserve = 0 if args.jobs > 1 else sum(plan[n][1] for n in later if n in args.parts)
        left = runner.left() - 5 - reserve  # 5 s for the files and the README at the end
        if left < least:
            note = f"budget: {max(left, 0):.0f} s left after the {reserve} s the later parts need; this part needs {least} s"
            log(f"[{name}] skipped: {note}")
            return {"status": "skipped", "note": note}
        log(f"[{name}] up to {min(most, left):.0f} s")
        part_started = time.monotonic()
        try:
            result = calls[name](runner, args, min(most, left))
        except Exception as e:  # noqa: BLE001 - a broken part is reported; the others still run
            result = {"error": f"{type(e).__name__}: {e}"}
        status = "ok" if "error" not in result else ("timeout" if result.get("timed_out") else "failed")
        part = {"status": status, "seconds": time.monotonic() - part_started, "result": result}
        if status != "ok":
            part["note"] = str(result.get("error"))[:300]
        log(f"[{name}] {status} in {part['seconds']:.0f} s: {part_figure(name, part)}")
        return part

    # One lane on an accelerator (parts must not share the chip); --jobs lanes for the CPU smoke run.
    with concurrent.futures.ThreadPoolExecutor(args.jobs) as pool:
        list(pool.map(run_part, PLAN))
    parts = {name: parts[name] for name in PLAN}

    # The device as the parts saw it (this process never starts jax).
    seen = [p["result"] for p in parts.values() if p.get("result")]
    seen += [r[side] for r in seen for side in ("jaxft",) if isinstance(r.get(side), dict)]
    device = next((r["device"] for r in seen if r.get("device") and r.get("backend")), "unknown")
    backend = next((r["backend"] for r in seen if r.get("device") == device and r.get("backend")), "unknown")
    jax_version = next((r["jax_version"] for r in seen if r.get("jax_version")), "unknown")
    date = time.strftime("%Y-%m-%d")
    prefix = f"{date}-{slug(device)}-suite"
    files = []
    for name, part in parts.items():
        if part.get("result"):
            result = dict(part["result"], device=part["result"].get("device") or device, smoke=args.smoke)
            path = os.path.join(results_dir, f"{prefix}-{name.replace('_', '-')}.json")
            with open(path, "w") as f:
                json.dump(result, f, indent=2)
            files.append(path)
            part["file"] = os.path.basename(path)
            if name == "profile" and result.get("table"):
                with open(os.path.join(results_dir, f"{prefix}-profile.txt"), "w") as f:
                    f.write(result["table"] + "\n")
    suite = {"benchmark": "accelerator_suite", "date": date, "device": device, "backend": backend,
             "jax_version": jax_version, "smoke": args.smoke, "budget_seconds": args.budget,
             "elapsed_seconds": time.monotonic() - started, "parts": parts}
    suite["goals"] = goals(parts)
    suite["summary"] = summary_table(suite)
    suite_path = os.path.join(results_dir, f"{prefix}.json")
    with open(suite_path, "w") as f:
        json.dump(suite, f, indent=2)
    files.append(suite_path)
    import make_readme

    readme = args.readme or (os.path.join(results_dir, "README.md") if args.smoke else os.path.join(HERE, "README.md"))
    make_readme.main(readme, results_dir=results_dir)
    print("\n" + suite["summary"], flush=True)
    if out_dir:  # at most 8 files come back: the suite's, the parts', and the log
        os.makedirs(out_dir, exist_ok=True)
        for path in files[-7:]:
            shutil.copy(path, out_dir)
        with open(os.path.join(out_dir, "suite.log"), "w") as f:
            f.write("\n".join(log_lines) + "\n\n" + suite["summary"] + "\n")
    return suite


if __name__ == "__main__":
    main()
