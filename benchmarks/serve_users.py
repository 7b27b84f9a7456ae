"""Several users at once on one Serve app with API keys on (BENCHMARKS.md "Several users at once", issue 20 item 4).

Each user has a key of its own (made with ``rau_ray.serve.keys``, as ``rau keys add`` makes them) and a session on an
image of its own (distinct phantom CT slices), and clicks positive points inside that image's liver: all users click
at once (a thread each, started together), one click in flight per user (a person waits for the mask before the next
click). Per level of users (1, 4, 16 by default), on the same app:
- click latency, the HTTP round trip of ``{"operations": [add_point]}``: the first click of a session (the Ingress
  fetches the image's SAM2 embedding from the Segmenter) apart from the later ones (decoded on the cached embedding);
  p50 / p99, clicks per second, errors;
- isolation: every request answered 200 (none lost or refused), each session holds exactly its own user's clicks
  (its ``points``, in order), every user's key gets 403 on another user's session (which stays as it was), and each
  session's final mask equals the mask of a fresh session, same image, same clicks, replayed by that user alone
  afterwards (no mask crossed from one session to another under load).
Bounded (a fixed click count per user), loopback only. Exit status 1 when an isolation check fails.
Use: ``.venv/bin/python benchmarks/serve_users.py --users 1 4 16 --clicks 10 --out runs/bench/serve_users.json``
"""

import argparse
import json
import os
import platform
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def pct(values: list[float], q: float) -> float | None:
    return round(float(np.percentile(values, q)) * 1000, 1) if values else None


def user_images(n: int, size: int = 128) -> list[tuple[bytes, list[tuple[int, int]]]]:
    """(16-bit PNG, liver pixels as (x, y)) of ``n`` distinct phantom CT slices showing the liver."""
    from rau_ray.data import formats
    from rau_ray.data.phantoms import get_phantom

    samples, seed = [], 3
    while len(samples) < n:
        samples += [s for s in get_phantom("ct-abdomen").generate_2d(seed, 11, size=size, slices=4)
                    if (s.label == 1).sum() > 50]
        seed += 1
    out = []
    for s in samples[:n]:
        ys, xs = np.nonzero(s.label == 1)
        out.append((formats.encode_png(formats.hu_to_png16(s.image)), list(zip(xs.tolist(), ys.tolist()))))
    return out


class User:
    """One person: a key, a session on their image, their clicks and what came back."""

    def __init__(self, base: str, key: str, png: bytes, pixels: list, clicks: int, seed: int):
        import requests

        self.http = requests.Session()
        self.http.headers["Authorization"] = f"Bearer {key}"
        self.base, self.png = base, png
        rng = np.random.default_rng(seed)
        self.points = [pixels[i] for i in rng.choice(len(pixels), size=clicks, replace=False)]
        self.sid, self.latencies, self.statuses, self.mask = None, [], [], None

    def open(self) -> str:
        r = self.http.post(self.base + "/v1/sessions", files={"image": ("x.png", self.png, "image/png")},
                           data={"modality": "CT"}, timeout=120)
        self.statuses.append(r.status_code)
        r.raise_for_status()
        return r.json()["id"]

    def click(self, sid: str, x: int, y: int) -> dict | None:
        body = {"operations": [{"op": "add_point", "positive": True, "x": int(x), "y": int(y), "count": 1}]}
        t = time.perf_counter()
        r = self.http.post(f"{self.base}/v1/sessions/{sid}/commands", json=body, timeout=120)
        self.latencies.append(time.perf_counter() - t)
        self.statuses.append(r.status_code)
        return r.json() if r.status_code == 200 else None

    def run(self, start: threading.Barrier) -> None:
        self.sid = self.open()
        start.wait()
        answer = None
        for x, y in self.points:
            answer = self.click(self.sid, x, y) or answer
        self.mask = None if answer is None else decode(answer["mask"])

    def replay_alone(self) -> np.ndarray | None:
        """The same clicks in a fresh session, this user alone: the mask the session should have ended with."""
        sid, answer = self.open(), None
        for x, y in self.points:
            answer = self.click(sid, x, y)
        self.http.delete(f"{self.base}/v1/sessions/{sid}", timeout=30)
        return None if answer is None else decode(answer["mask"])


def decode(mask: dict) -> np.ndarray:
    from rau_ray.serve import codecs

    return codecs.rle_decode(mask)


def level(base: str, keys: list[str], images: list, clicks: int) -> dict:
    """All ``len(keys)`` users clicking at once; then the isolation checks."""
    users = [User(base, k, png, pixels, clicks, seed) for seed, (k, (png, pixels)) in enumerate(zip(keys, images))]
    start = threading.Barrier(len(users))
    threads = [threading.Thread(target=u.run, args=(start,)) for u in users]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    first = [u.latencies[0] for u in users if u.latencies]
    later = [v for u in users for v in u.latencies[1:]]
    sent = sum(len(u.statuses) for u in users)
    checks = {"every_request_200": all(s in (200, 201) for u in users for s in u.statuses),
              "requests": sent, "clicks_answered": sum(len(u.latencies) for u in users)}
    own, foreign_refused, same_as_alone = True, True, True
    for i, u in enumerate(users):
        state = u.http.get(f"{base}/v1/sessions/{u.sid}", timeout=30).json()
        own &= [tuple(p[:2]) for p in state["points"]] == [tuple(p) for p in u.points]
        if len(users) > 1:
            other = users[(i + 1) % len(users)]
            before = other.http.get(f"{base}/v1/sessions/{other.sid}", timeout=30).json()
            foreign_refused &= u.http.get(f"{base}/v1/sessions/{other.sid}", timeout=30).status_code == 403
            foreign_refused &= u.http.post(f"{base}/v1/sessions/{other.sid}/undo", timeout=30).status_code == 403
            foreign_refused &= other.http.get(f"{base}/v1/sessions/{other.sid}", timeout=30).json() == before
    for u in users:
        alone = u.replay_alone()
        same_as_alone &= u.mask is not None and alone is not None and np.array_equal(u.mask, alone)
        u.http.delete(f"{base}/v1/sessions/{u.sid}", timeout=30)
    checks.update(sessions_hold_only_their_clicks=bool(own), foreign_session_403=bool(foreign_refused),
                  masks_equal_replayed_alone=bool(same_as_alone))
    return {"users": len(users), "clicks_per_user": clicks, "wall_s": round(wall, 2),
            "clicks_per_s": round((len(first) + len(later)) / wall, 1),
            "first_click_ms": {"p50": pct(first, 50), "p99": pct(first, 99), "n": len(first)},
            "click_ms": {"p50": pct(later, 50), "p99": pct(later, 99), "n": len(later)}, "checks": checks}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--users", type=int, nargs="+", default=[1, 4, 16])
    ap.add_argument("--clicks", type=int, default=10, help="clicks per user and level")
    ap.add_argument("--out", default="runs/bench/serve_users.json")
    args = ap.parse_args()
    if max(args.users) > 64 or args.clicks > 100:
        ap.error("bounded: at most 64 users and 100 clicks a user")

    from rau_ray.serve import keys as keyfile
    from rau_ray.serve.app import start, stop

    folder = Path(tempfile.mkdtemp(prefix="rau-serve-users-"))
    path = folder / "keys.json"
    made = [keyfile.add_key(path, f"user{i}") for i in range(max(args.users))]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    t0 = time.perf_counter()
    base = start(profile="tiny", port=port, api_keys_file=str(path), max_sessions=4 * max(args.users),
                 max_sessions_per_key=4, requests_per_minute_per_key=100_000, audit_log=str(folder / "audit.jsonl"),
                 timeout_s=600)
    started = time.perf_counter() - t0
    images = user_images(max(args.users) + 1)
    try:
        level(base, made[:1], images[-1:], 2)  # warm-up on an image of no user's: the lazy first-request work
        levels = [level(base, made[:n], images[:n], args.clicks) for n in args.users]
    finally:
        stop()
    report = {"date": time.strftime("%Y-%m-%d %H:%M"), "machine": f"{platform.machine()}, {os.cpu_count()} cores",
              "command": " ".join([Path(sys.executable).name, *sys.argv]), "app_start_s": round(started, 1),
              "levels": levels}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print("| users | clicks | first click p50 / p99 ms | click p50 / p99 ms | clicks/s | all 200 | own clicks only | "
          "403 on another's | = replayed alone |")
    print("|---|---|---|---|---|---|---|---|---|")
    for lv in levels:
        c = lv["checks"]
        print(f"| {lv['users']} | {lv['click_ms']['n'] + lv['first_click_ms']['n']} | "
              f"{lv['first_click_ms']['p50']} / {lv['first_click_ms']['p99']} | {lv['click_ms']['p50']} / "
              f"{lv['click_ms']['p99']} | {lv['clicks_per_s']:.1f} | {c['every_request_200']} | "
              f"{c['sessions_hold_only_their_clicks']} | {c['foreign_session_403']} | "
              f"{c['masks_equal_replayed_alone']} |")
    ok = all(v for lv in levels for k, v in lv["checks"].items() if isinstance(v, bool))
    print(f"-> {args.out}; isolation checks {'passed' if ok else 'FAILED'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
