"""Benchmark: natural-language command parser accuracy and per-command latency on the command corpus.

Accuracy = exact match of the operation list (a hostile / unrelated row counts as right when it raises
CommandError), per corpus part, with counts and Wilson 95 % intervals: ``dev`` (the parser was fixed on it; issue 8's
rows and issue 20's rows from radiology tools' wording), ``dev, was held-out round 1`` (issue 20's first held-out set,
measured once as held out at commit f050e75's parser, 90c7364, then made development rows: ``"round": 1``),
``heldout`` (issue 8, written after that parser was frozen) and ``heldout_issue20_round2``
(``tests/data/commands_heldout2.jsonl``, written after the round-2 parser was frozen).
Latency = wall time of one ``parse_command`` call, median and p99 over every row, repeated.
The LLM fallback's grounding (no model is run): ``fallback_oracle`` = of the commands the parser refuses, how many a
model answering exactly the expected operations would get through ``validate_operations`` (an upper bound on what the
fallback can add); ``fallback_adversary`` = the hostile texts a model answering each operation shape would turn into
an operation.
Run: ``.venv/bin/python benchmarks/command_parser.py [--corpus FILE ...] [--repeats 20]`` (default: both corpora).
"""

import argparse
import json
import math
import platform
import statistics
import time
from pathlib import Path

from rau_ray.commands import EXPORT_FORMATS, WINDOW_PRESETS, CommandError, parse_command

DATA = Path(__file__).resolve().parents[1] / "tests" / "data"
CORPORA = (DATA / "commands_corpus.jsonl", DATA / "commands_heldout2.jsonl")


def part_of(row: dict) -> str:
    """The row's corpus part; round 1's former held-out rows are reported apart from the other development rows."""
    return f"{row['part']}, was held-out round {row['round']}" if "round" in row else row["part"]


def wilson(k: int, n: int, z: float = 1.959964) -> list[float]:
    """Wilson score interval (95 %) of a proportion k / n."""
    if n == 0:
        return [0.0, 1.0]
    p, d = k / n, 1 + z * z / n
    centre, half = (p + z * z / (2 * n)) / d, z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / d
    return [round(max(0.0, centre - half), 4), round(min(1.0, centre + half), 4)]


def evaluate(rows: list[dict]) -> dict:
    """Accuracy of each part (commands, hostile rows, all) with counts and Wilson intervals, and the misses."""
    out, misses = {}, []
    for part in sorted({part_of(r) for r in rows}) + ["all"]:
        sel = [r for r in rows if part in ("all", part_of(r))]
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
        (k_c, n_c), (k_h, n_h) = right["commands"], right["hostile"]
        out[part] = {"commands": n_c, "commands_right": k_c, "hostile": n_h, "hostile_refused_n": k_h,
                     "command_accuracy": round(k_c / max(1, n_c), 4), "command_accuracy_ci95": wilson(k_c, n_c),
                     "hostile_refused": round(k_h / max(1, n_h), 4), "hostile_refused_ci95": wilson(k_h, n_h),
                     "accuracy": round((k_c + k_h) / max(1, n), 4)}
    return {"parts": out, "misses": misses}


_POINT = {"op": "add_point", "positive": True, "x": None, "y": None, "count": 1}
SHAPES = [{"op": "segment", "target": "liver"}, _POINT, {**_POINT, "positive": False}, {"op": "add_box", "box": None},
          {"op": "undo", "steps": 1}, {"op": "redo", "steps": 1}, {"op": "clear"},
          *({"op": "set_window", "preset": p, "level": None, "width": None} for p in WINDOW_PRESETS),
          {"op": "goto_slice", "index": None, "delta": 1}, {"op": "goto_slice", "index": None, "delta": -1},
          *({"op": "propagate", "direction": d} for d in ("both", "forward", "backward")),
          *({"op": "export", "format": f} for f in EXPORT_FORMATS), {"op": "show_metrics"}]


def fallback(rows: list[dict]) -> dict:
    """Per part: commands the parser refuses that an oracle model's answer would get through the grounding check,
    and hostile texts an adversarial model (every operation shape) would get through."""
    out = {}
    for part in sorted({part_of(r) for r in rows}):
        rescued, refused, adversary = [], 0, []
        for r in (r for r in rows if part_of(r) == part):
            if r["ops"] is None:
                for op in SHAPES:
                    try:
                        adversary.append([r["text"], parse_command(r["text"], fallback=lambda _t, op=op: [op])])
                    except CommandError:
                        pass
                continue
            try:
                parse_command(r["text"])
                continue
            except CommandError:
                refused += 1
            try:
                if parse_command(r["text"], fallback=lambda _t, ops=r["ops"]: ops) == r["ops"]:
                    rescued.append(r["text"])
            except CommandError:
                pass
        out[part] = {"refused_commands": refused, "oracle_rescued": len(rescued), "adversary_accepted": adversary}
    return out


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
    p.add_argument("--corpus", nargs="+", default=[str(c) for c in CORPORA if c.exists()],
                   help="JSONL rows: text, ops, part")
    p.add_argument("--repeats", type=int, default=20)
    a = p.parse_args()
    rows = [json.loads(line) for c in a.corpus for line in Path(c).read_text().splitlines() if line.strip()]
    t0 = time.perf_counter()
    parse_command("segment the liver")  # first call: regex compilation
    first_ms = (time.perf_counter() - t0) * 1e3
    result = {"date": time.strftime("%Y-%m-%d"), "machine": f"{platform.machine()}, {platform.python_version()}",
              "corpus": a.corpus, "rows": len(rows), **evaluate(rows), "fallback": fallback(rows),
              "first_call_ms": round(first_ms, 3),
              "latency": latency(rows, a.repeats)}
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
