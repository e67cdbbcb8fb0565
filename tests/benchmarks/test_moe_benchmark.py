"""MoE train-step compile time does not grow with depth (scanned layers): 24 layers compile within
1.5× of 2 at the same width."""

import importlib.util
import os

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _bench():
    spec = importlib.util.spec_from_file_location("moe_bench", os.path.join(ROOT, "benchmarks", "moe.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_compile_time_24_layers_within_1_5x_of_2():
    bench = _bench()
    tiny = bench.PRESETS["tiny"]
    bench.compile_seconds(tiny, 2)  # warm the tracing caches shared by both
    shallow = bench.compile_seconds(tiny, 2)
    deep = bench.compile_seconds(tiny, 24)
    assert deep <= 1.5 * shallow, f"24 layers compiled in {deep:.1f} s, 2 layers in {shallow:.1f} s"
