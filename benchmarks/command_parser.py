"""Benchmark: natural-language command parser accuracy and per-command latency on the command corpus.

Accuracy = exact match of the operation list (a hostile / unrelated row counts as right when it raises
CommandError), per corpus part: ``dev`` (written first; the parser was fixed on it) and ``heldout`` (written after
the parser was frozen). Latency = wall time of one ``parse_command`` call, median and p99 over every row, repeated.
Run: ``.venv/bin/python benchmarks/command_parser.py [--corpus tests/data/commands_corpus.jsonl] [--repeats 20]``.
"""

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

from rau_ray.commands import CommandError, parse_command

CORPUS = Path(__file__).resolve().parents[1] / "tests" / "data" / "commands_corpus.jsonl"


def evaluate(rows: list[dict]) -> dict:
    """Accuracy of each part (commands, hostile rows, all) and the misses."""
    out, misses = {}, []
    for part in sorted({r["part"] for r in rows}) + ["all"]:
        sel = [r for r in rows if part in ("all", r["part"])]
        right = {"commands": [0, 0], "hostile": [0, 0]}
        for r in sel:
            try:
                got = parse_command(r["text"])
            except CommandError:
                got = None
            kind = "hostile" if r["ops"] is None else "commands"
            right[kind][0] += got == r["ops"]
            right[kind][1] += 1
            if got != r["ops"] and part != "all":
                misses.append({"part": part, "text": r["text"][:80], "expected": r["ops"], "got": got})
        n = right["commands"][1] + right["hostile"][1]
        out[part] = {"commands": right["commands"][1], "hostile": right["hostile"][1],
                     "command_accuracy": round(right["commands"][0] / max(1, right["commands"][1]), 4),
                     "hostile_refused": round(right["hostile"][0] / max(1, right["hostile"][1]), 4),
                     "accuracy": round((right["commands"][0] + right["hostile"][0]) / max(1, n), 4)}
    return {"parts": out, "misses": misses}


def latency(rows: list[dict], repeats: int) -> dict:
    times = []
    for _ in range(repeats):
        for r in rows:
            t0 = time.perf_counter()
            try:
                parse_command(r["text"])
            except CommandError:
                pass
            times.append((time.perf_counter() - t0) * 1e3)
    times.sort()
    return {"calls": len(times), "median_ms": round(statistics.median(times), 4),
            "p99_ms": round(times[int(0.99 * (len(times) - 1))], 4), "max_ms": round(times[-1], 4)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--corpus", default=str(CORPUS))
    p.add_argument("--repeats", type=int, default=20)
    a = p.parse_args()
    rows = [json.loads(line) for line in Path(a.corpus).read_text().splitlines() if line.strip()]
    t0 = time.perf_counter()
    parse_command("segment the liver")  # first call: regex compilation
    first_ms = (time.perf_counter() - t0) * 1e3
    result = {"date": time.strftime("%Y-%m-%d"), "machine": f"{platform.machine()}, {platform.python_version()}",
              "corpus": a.corpus, "rows": len(rows), **evaluate(rows), "first_call_ms": round(first_ms, 3),
              "latency": latency(rows, a.repeats)}
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
