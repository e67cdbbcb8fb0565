"""Top ops by time of a jax.profiler trace, as a small text table.

    python benchmarks/profile_summary.py /tmp/trace [--top 20]

Reads the newest `*.xplane.pb` under the trace folder with jax.profiler.ProfileData (no
TensorBoard needed). On a GPU the ops are the device plane's "XLA Ops" line (one event per HLO op
per execution); on a CPU, which has no device plane, the host events that carry an `hlo_op`.
"""

from __future__ import annotations

import argparse
import collections
import glob
import os


def newest_xplane(trace_dir: str) -> str:
    paths = glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True)
    if not paths:
        raise FileNotFoundError(f"no *.xplane.pb under {trace_dir}: was jax.profiler.trace({trace_dir!r}) run?")
    return max(paths, key=os.path.getmtime)


def self_times(events) -> list[tuple[object, float]]:
    """(event, its own ns): an event's duration less that of the events nested inside it on the
    same line (a while loop's body ops), so that nothing is counted twice."""
    events = sorted(events, key=lambda e: (e.start_ns, -e.duration_ns))
    out, stack = [], []  # stack: [end_ns, index into out]
    for event in events:
        while stack and stack[-1][0] <= event.start_ns:
            stack.pop()
        if stack:
            parent = out[stack[-1][1]]
            out[stack[-1][1]] = (parent[0], parent[1] - event.duration_ns)
        out.append((event, float(event.duration_ns)))
        stack.append([event.end_ns, len(out) - 1])
    return out


def op_times(trace_dir: str) -> tuple[str, dict[str, list[float]]]:
    """(where the ops were read, {op name: [count, total ns]}, {op name: what it is, where known})."""
    from jax.profiler import ProfileData

    data = ProfileData.from_file(newest_xplane(trace_dir))
    ops: dict[str, list[float]] = collections.defaultdict(lambda: [0, 0.0])
    details: dict[str, str] = {}
    device_planes = [p for p in data.planes if p.name.startswith("/device:")]
    for plane in device_planes:
        for line in plane.lines:
            if line.name == "XLA Ops":
                for event, ns in self_times(line.events):
                    ops[event.name][0] += 1
                    ops[event.name][1] += ns
                    if event.name not in details:  # what the op is: its HLO text, or category
                        stats = dict(event.stats)
                        details[event.name] = str(stats.get("long_name") or stats.get("hlo_category") or "")
    if ops:
        return ", ".join(p.name for p in device_planes), dict(ops), details
    for plane in data.planes:  # CPU: XLA runs the ops on host threads, tagged with their HLO op
        for line in plane.lines:
            tagged = [(e, dict(e.stats)) for e in line.events]
            names = {id(e): str(stats["hlo_op"]) for e, stats in tagged if "hlo_op" in stats}
            for event, ns in self_times([e for e, _ in tagged if id(e) in names]):
                ops[names[id(event)]][0] += 1
                ops[names[id(event)]][1] += ns
    return "host threads (hlo_op events)", dict(ops), details


def summarize(trace_dir: str, top: int = 20) -> dict:
    """{"source", "total_ms", "ops": [{"op", "count", "total_ms", "share", "detail"}], "table": text}."""
    source, ops, details = op_times(trace_dir)
    total = sum(ns for _, ns in ops.values()) or 1.0
    rows = sorted(ops.items(), key=lambda kv: -kv[1][1])[:top]
    out = [{"op": name, "count": int(count), "total_ms": ns / 1e6, "share": ns / total, "detail": details.get(name, "")}
           for name, (count, ns) in rows]
    lines = [f"{'op':<32} {'count':>6} {'ms':>10} {'share':>6}  what", "-" * 100]
    lines += [f"{r['op'][:32]:<32} {r['count']:>6} {r['total_ms']:>10.3f} {r['share']:>6.1%}  {r['detail'][:40]}"
              for r in out]
    lines.append(f"{'all ops':<32} {sum(int(c) for c, _ in ops.values()):>6} {total / 1e6:>10.3f} {1:>6.0%}")
    return {"source": source, "total_ms": total / 1e6, "ops": out, "table": "\n".join(lines)}


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("trace_dir")
    p.add_argument("--top", type=int, default=20)
    args = p.parse_args()
    print(summarize(args.trace_dir, args.top)["table"])
