"""Load test of `evl serve` on loopback: searches per second and p50/p99 latency with concurrent clients.

Builds an index of a generated SynthVL folder with the tiny model (random weights unless `--model`
names a checkpoint: the search cost does not depend on what the weights learnt), starts the server
on 127.0.0.1 in this process (uvicorn, one worker), and runs `--clients` threads that each send
`--requests` searches (k = 10, queries drawn from the captions) plus one thumbnail fetch per search.
Reports searches/s over the whole run, p50/p99 latency of the searches (p99 by nearest rank; every
latency is kept in the JSON), and the error count (any
non-200 or exception), which must be 0.

Usage: python benchmarks/serve_load.py [--clients 8] [--requests 50] [--clips 200] [--model CKPT] [--work DIR]
Prints a table and writes benchmarks/results/serve_load.json.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import socket
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results" / "serve_load.json"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def nearest_rank(values: list[float], pct: float) -> float:
    """The nearest-rank percentile: the ⌈pct/100 · n⌉-th smallest value (p99 of 400 = the 396th)."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(pct / 100 * len(ordered)) - 1)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--requests", type=int, default=50, help="searches per client")
    ap.add_argument("--clips", type=int, default=200)
    ap.add_argument("--model", default=None)
    ap.add_argument("--work", type=Path, default=None)
    ap.add_argument("--json", type=Path, default=RESULTS)
    args = ap.parse_args()
    sys.path.insert(0, str(HERE))
    from _meta import finish_meta, run_meta

    meta = run_meta(seeds=list(range(args.clients)), precision="fp32")   # client i draws queries with seed i
    import httpx
    import uvicorn

    from evl.data.annotations import read_annotations
    from evl.data.synthetic import write_synthvl
    from evl.models.model import build_model
    from evl.precision import cpu_info
    from evl.recipes import load_recipe
    from evl.search.app import create_app
    from evl.search.index import build_index

    with tempfile.TemporaryDirectory() as tmp:
        work = args.work or Path(tmp)
        data = work / "synthvl"
        if not (data / "videos").is_dir():
            write_synthvl(data, clips=args.clips, seed=0, frames=8, size=64)
        model = args.model
        if model is None:
            model = work / "tiny-random"
            if not (model / "config.json").is_file():
                build_model(load_recipe("pretrain-tiny").model).save_pretrained(model)
        t0 = time.perf_counter()
        report = build_index(data / "videos", Path(model), work / "index")
        index_s = time.perf_counter() - t0
        captions = [c for r in read_annotations(data / "annotations" / "retrieval_test.json") for c in r.captions]
        port = _free_port()
        server = uvicorn.Server(uvicorn.Config(create_app(work / "index"), host="127.0.0.1", port=port,
                                               log_level="warning"))
        thread = threading.Thread(target=server.run, daemon=True)
        thread.start()
        while not server.started:
            time.sleep(0.05)
        latencies: list[float] = []
        errors: list[str] = []
        lock = threading.Lock()

        def client(seed: int) -> None:
            rng = random.Random(seed)
            with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as http:
                for _ in range(args.requests):
                    try:
                        t = time.perf_counter()
                        r = http.get("/api/search", params={"q": rng.choice(captions), "k": 10})
                        took = time.perf_counter() - t
                        ok = r.status_code == 200
                        if ok and r.json():
                            ok = http.get(f"/api/thumbnail/{r.json()[0]['item']}").status_code == 200
                        with lock:
                            latencies.append(took)
                            if not ok:
                                errors.append(f"HTTP {r.status_code}")
                    except Exception as e:   # noqa: BLE001 - every failure is counted, none stops the run
                        with lock:
                            errors.append(repr(e))

        t0 = time.perf_counter()
        threads = [threading.Thread(target=client, args=(i,)) for i in range(args.clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.perf_counter() - t0
        server.should_exit = True
        thread.join(timeout=10)
    info = cpu_info()
    result = {"cpu": info, "clients": args.clients, "searches": len(latencies), "errors": len(errors),
              "error_examples": errors[:5], "searches_per_s": round(len(latencies) / wall, 1),
              "p50_ms": round(1000 * statistics.median(latencies), 1),
              "p99_ms": round(1000 * nearest_rank(latencies, 99), 1),
              "p99_definition": "nearest rank: the ceil(0.99 n)-th smallest latency",
              "index_items": report.items, "index_build_s": round(index_s, 1), "model": str(model),
              "latencies_ms": [round(1000 * t, 2) for t in latencies], "wall_s": round(wall, 2)}
    result = {"meta": finish_meta(meta), **result}
    print(f"CPU: {info['model']} ({info['capability']}, {info['cores']} cores), torch {info['torch']}")
    print(f"{'clients':>8s} {'searches':>9s} {'errors':>7s} {'searches/s':>11s} {'p50 ms':>8s} {'p99 ms':>8s} {'items':>6s}")
    print(f"{args.clients:>8d} {result['searches']:>9d} {result['errors']:>7d} {result['searches_per_s']:>11.1f} "
          f"{result['p50_ms']:>8.1f} {result['p99_ms']:>8.1f} {report.items:>6d}")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2))
    print(f"wrote {args.json}")
    if errors:
        sys.exit(1)


if __name__ == "__main__":
    main()
