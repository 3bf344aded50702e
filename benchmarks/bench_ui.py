"""Benchmark: the web view's index on a store with 10,000 versions (target: first page < 1 s).

Builds (or reuses, with ``--store DIR``) a store of ``--names`` names with
``--per-name`` versions each (default 2,000 x 5 = 10,000 versions), every version a
tiny synthetic PEFT adapter pushed through :meth:`registry.storage.store.Store.push` (the real
write path: blobs, manifest, binding, audit entry), with labels and a base model per
name and a gate record on every 10th name. ``os.fsync`` is stubbed out while
building: the store is scratch, and durability is not what is measured (building
then takes about 4 ms per version instead of 30).

Then it times, through Starlette's TestClient (routing, the guard, Jinja2 rendering):
the first index page (cold, then warm), a name filter, a label filter that matches
one name in ten and a base-model filter matching none (both scan every name's newest
manifest), the last page, one version page and the first audit page.

Run: ``python benchmarks/bench_ui.py [--store DIR] [--names N] [--per-name K]``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def build(store_dir: Path, names: int, per_name: int) -> None:
    """Push ``names * per_name`` tiny versions (skipped when the store already has them)."""
    from registry.digests import canonical_json
    from registry.ingest import prepare_adapter
    from registry.record import build_record
    from registry.storage.store import Store
    from tests.support.cli import write_synthetic_adapter

    st = Store.open(store_dir, create=True)
    if len(st.bindings()) >= names * per_name:
        return
    real_fsync = os.fsync
    os.fsync = lambda fd: None  # scratch store: skip durability while building
    started = time.perf_counter()
    try:
        work = Path(tempfile.mkdtemp(prefix="bench-ui-"))
        adapter = write_synthetic_adapter(work / "a", hidden=4, layers=1, r=1)
        policy = st.put_bytes(canonical_json({"policy": {"version": 1, "checks": []}, "data": {}}))
        with prepare_adapter(adapter) as prepared:
            for n in range(names):
                name = f"team{n % 20:02d}/adapter-{n:05d}"
                for k in range(per_name):
                    record = build_record(
                        prepared.peft_config, prepared.tensors, base_model=f"base-{n % 7}",
                        labels={"team": f"t{n % 10}", "n": str(n), "k": str(k)},
                        metrics={"accuracy": (n * 7 + k) % 100 / 100})
                    version = st.push(name, prepared.files, record).version
                if n % 10 == 0:
                    st.put_gate_record(version.digest, policy, {
                        "candidate": version.ref, "candidate_digest": version.digest,
                        "policy_digest": policy, "passed": n % 20 == 0, "checks": [],
                        "meta": {"started": version.created}})
                if n % 500 == 499:
                    done = (n + 1) * per_name
                    print(f"  built {done} versions ({time.perf_counter() - started:.0f} s)",
                          file=sys.stderr)
    finally:
        os.fsync = real_fsync


def timed(client: object, url: str, repeat: int = 3) -> tuple[float, float, int]:
    """(first, median of the rest) seconds of GET ``url``, and the status."""
    times, status = [], 0
    for _ in range(repeat):
        t = time.perf_counter()
        response = client.get(url)  # type: ignore[attr-defined]
        times.append(time.perf_counter() - t)
        status = response.status_code
    return times[0], statistics.median(times[1:] or times), status


def main() -> int:
    """Build the store, time the pages, print a table and one JSON line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", type=Path, default=None, help="store dir (reused if full)")
    parser.add_argument("--names", type=int, default=2000)
    parser.add_argument("--per-name", type=int, default=5)
    args = parser.parse_args()
    store_dir = args.store or Path(tempfile.mkdtemp(prefix="bench-ui-store-")) / "store"
    t = time.perf_counter()
    build(store_dir, args.names, args.per_name)
    build_s = time.perf_counter() - t

    from starlette.testclient import TestClient

    from cli.web.app import create_app
    from registry.storage.store import Store

    st = Store.open(store_dir)
    client = TestClient(create_app(st), base_url="http://127.0.0.1")
    versions = len(st.bindings())
    last_page = (args.names + 49) // 50
    one = st.resolve("team00/adapter-00000").ref
    cases = {
        "index page 1": "/",
        "index, name filter": "/?q=adapter-0199",
        "index, label filter (1 in 10)": "/?label=team=t3",
        "index, base filter (no match)": "/?base=nothing",
        f"index page {last_page} (last)": f"/?page={last_page}",
        "version page": f"/v/{one}",
        "audit page 1": "/audit",
    }
    results = {}
    print(f"store {store_dir}: {versions} versions, {args.names} names "
          f"(built/checked in {build_s:.1f} s)")
    print(f"{'page':36} {'first s':>8} {'warm s':>8}  status")
    for label, url in cases.items():
        first, warm, status = timed(client, url)
        results[label] = {"first_s": round(first, 4), "warm_s": round(warm, 4), "status": status}
        print(f"{label:36} {first:8.3f} {warm:8.3f}  {status}")
    ok = results["index page 1"]["first_s"] < 1.0
    print(f"first index page under 1 s: {'yes' if ok else 'NO'}")
    print(json.dumps({"versions": versions, "names": args.names, "results": results}))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
