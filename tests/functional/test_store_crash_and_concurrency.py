"""Crash safety and concurrency of the store, with real processes.

* A push SIGKILLed halfway through copying a large file leaves no visible version
  and no partial blob; gc then removes its leftovers, and the store still works.
* 8 processes moving one alias with compare-and-swap retry loops lose no update:
  the audit log holds exactly one entry per successful move, each entry's ``old`` is
  the previous entry's ``new``, and the chain verifies.
* 8 processes pushing at once (some identical content) all land, deduplicated.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import random
import signal
import subprocess
import textwrap
from pathlib import Path

import pytest

from registry.digests import sha256_digest
from registry.errors import ConflictError, NotFoundError
from registry.maintenance.collection import gc
from registry.maintenance.integrity import verify
from registry.storage.store import Store
from tests.support.registry import (PYTHON, REPO_ROOT, adapter_files, child_env,
                                     make_adapter_dir, new_store, push_adapter, run_together,
                                     sample_record)

WORKERS = 8
MOVES_PER_WORKER = 10
BIG = 48 << 20

KILLER = textwrap.dedent("""
    import os, signal, sys
    from pathlib import Path
    from registry.storage.store import Store
    from tests.support.registry import sample_record

    root, big, config = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])
    total, done = big.stat().st_size + config.stat().st_size, 0

    def progress(n):
        global done
        done += n
        if done >= total // 2:
            os.kill(os.getpid(), signal.SIGKILL)

    Store.open(root).push("big", {"adapter_config.json": config,
                                  "adapter_model.safetensors": big},
                          sample_record(), progress=progress)
    print("push finished: the kill did not happen")
""")


def _all_blobs_intact(store: Store) -> None:
    for path in (store.root / "blobs" / "sha256").iterdir():
        assert sha256_digest(path.read_bytes()) == "sha256:" + path.name, f"partial blob {path}"


def test_killed_push_leaves_no_version_and_no_partial_blob(tmp_path: Path) -> None:
    store = new_store(tmp_path)
    big = tmp_path / "big.safetensors"
    with open(big, "wb") as handle:
        for _ in range(BIG >> 20):
            handle.write(os.urandom(1 << 20))
    config = make_adapter_dir(tmp_path / "cfg") / "adapter_config.json"
    before_audit = len(store.audit().entries())

    proc = subprocess.run([PYTHON, "-c", KILLER, str(store.root), str(big), str(config)],
                          env=child_env(), cwd=REPO_ROOT, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stdout + proc.stderr

    with pytest.raises(NotFoundError):
        store.resolve("big")
    assert store.names() == [] and store.versions() == []
    big_digest = sha256_digest(big.read_bytes())
    assert not store.blobs.exists(big_digest)
    _all_blobs_intact(store)
    leftovers = list((store.root / "tmp").iterdir())
    assert leftovers and all(p.name.endswith(".partial") for p in leftovers)
    assert len(store.audit().entries()) == before_audit  # no push was logged
    assert store.audit().verify().ok

    report = gc(store, 0)
    assert report.temp_removed and not list((store.root / "tmp").iterdir())
    assert store.blobs.all_digests() == []  # the finished config blob was unreachable
    # locks died with the process: the same push now succeeds
    result = store.push("big", {"adapter_config.json": config, "adapter_model.safetensors": big},
                        sample_record())
    assert result.created and store.blobs.exists(big_digest)
    assert verify(store).ok and store.audit().verify().ok


def _mover(root: str, name: str, digests: list[str], moves: int, seed: int,
           start: mp.synchronize.Event, results: mp.Queue) -> None:
    store = Store.open(root)
    rng = random.Random(seed)
    done = conflicts = 0
    start.wait()
    while done < moves:
        current = store.aliases(name).get("candidate")
        target = rng.choice([d for d in digests if d != current])
        try:
            store.set_alias(name, "candidate", target, expect=current, actor=f"worker-{seed}")
        except ConflictError:
            conflicts += 1
            continue
        done += 1
    results.put((seed, done, conflicts))


def test_concurrent_cas_alias_moves_lose_no_update(tmp_path: Path) -> None:
    store = new_store(tmp_path)
    digests = [push_adapter(store, "lora", make_adapter_dir(tmp_path / f"a{i}", seed=i),
                            metrics={"eval_loss": float(i)}).version.digest for i in range(4)]
    store.set_alias("lora", "candidate", digests[0], expect=None)

    outcomes = run_together(_mover, [(str(store.root), "lora", digests, MOVES_PER_WORKER, seed)
                                     for seed in range(WORKERS)])

    successes = sum(done for _, done, _ in outcomes)
    assert successes == WORKERS * MOVES_PER_WORKER
    moves = [e for e in store.audit().entries()
             if e["action"] == "alias" and e["subject"] == "lora:candidate"]
    assert len(moves) == 1 + successes  # the initial set + every successful move, no more
    assert moves[0]["old"] is None and moves[0]["new"] == digests[0]
    for prev, entry in zip(moves, moves[1:], strict=False):
        assert entry["old"] == prev["new"], "an update was lost or applied twice"
        assert entry["new"] != entry["old"]
    assert store.aliases("lora")["candidate"] == moves[-1]["new"]
    per_worker = {seed: done for seed, done, _ in outcomes}
    for seed in range(WORKERS):
        assert sum(e["actor"] == f"worker-{seed}" for e in moves) == per_worker[seed]
    report = store.audit().verify()
    assert report.ok, report.to_json()


def _pusher(root: str, adapter_dir: str, name: str, start: mp.synchronize.Event,
            results: mp.Queue) -> None:
    store = Store.open(root)
    start.wait()
    result = store.push(name, adapter_files(Path(adapter_dir)), sample_record(Path(adapter_dir)))
    results.put((name, result.version.digest, result.created))


def test_concurrent_pushes_all_land_and_deduplicate(tmp_path: Path) -> None:
    store = new_store(tmp_path)
    shared = make_adapter_dir(tmp_path / "shared", seed=99)
    jobs = [(str(shared), "same") for _ in range(4)]
    jobs += [(str(make_adapter_dir(tmp_path / f"u{i}", seed=i)), f"unique-{i}") for i in range(4)]
    outcomes = run_together(_pusher, [(str(store.root), d, n) for d, n in jobs])
    same = [o for o in outcomes if o[0] == "same"]
    assert len({digest for _, digest, _ in same}) == 1
    assert sum(created for _, _, created in same) == 1  # exactly one push created it
    assert len(store.versions("same")) == 1
    assert store.names() == ["same"] + [f"unique-{i}" for i in range(4)]
    assert verify(store).ok and store.audit().verify().ok
    assert not list((store.root / "tmp").iterdir())
