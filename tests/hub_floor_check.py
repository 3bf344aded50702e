"""Check ``registry.interop.hub`` against whichever huggingface_hub the running interpreter has.

Not collected by pytest (no ``test_`` prefix): CI installs one huggingface_hub, and
the floor declared in ``pyproject.toml`` is checked by hand, per release, like this::

    python -m venv /tmp/hubvenv
    echo "$PWD/.venv/lib/python3.11/site-packages" \\
        > /tmp/hubvenv/lib/python3.11/site-packages/zz_project.pth   # the project's deps
    /tmp/hubvenv/bin/pip install huggingface_hub==X.Y.Z              # shadows the venv's copy
    /tmp/hubvenv/bin/python tests/hub_floor_check.py

It needs neither torch nor transformers (transformers 5 refuses a huggingface_hub
older than 1.31 at import, so ``tests/functional/test_hub.py`` can only run at 1.31+):
a pure-Python LoRA (:func:`tests.support.registry.make_adapter_dir`) is laid into a
hand-made HF cache (:func:`tests.support.hub.populate_hf_cache`), then ``adapters``
runs in offline child processes, exactly as in ``test_hub.py``: pull by default
branch, tag and 40-hex commit (the case huggingface_hub 1.x broke offline), a repo
and a branch that are not cached (exit 5), and ``push-hub`` with the real ``HfApi``
offline (exit 2). Prints the version and ``ok``, or the failures, and exits 0 or 1.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.support.hub import commit_sha, hub_env, populate_hf_cache, run_cli  # noqa: E402
from tests.support.registry import make_adapter_dir  # noqa: E402

REPO = "acme/floor-lora"


def check(tmp: Path) -> list[str]:
    """Run every case under ``tmp``; the failures, as messages."""
    first, second = commit_sha("floor-1"), commit_sha("floor-2")
    env = hub_env(tmp)
    cache = Path(env["HF_HUB_CACHE"])
    populate_hf_cache(cache, REPO, make_adapter_dir(tmp / "a1", seed=1), commit=first)
    populate_hf_cache(cache, REPO, make_adapter_dir(tmp / "a2", seed=2), commit=second,
                      refs=("v2",))
    store = tmp / "store"
    failures: list[str] = []
    code, _out, err = run_cli(env, "init", "--store", store)
    if code:
        return [f"init exited {code}: {err[-2000:]}"]
    cases = [(f"hf://{REPO}", 0, first), (f"hf://{REPO}@v2", 0, second),
             (f"hf://{REPO}@{second}", 0, second), ("hf://acme/not-cached", 5, None),
             (f"hf://{REPO}@no-such-branch", 5, None)]
    for source, expected, commit in cases:
        code, out, err = run_cli(env, "pull", source, "--name", "floor", "--store", store,
                                 "--json")
        try:
            data = json.loads(out)
        except ValueError:
            data = {}
        if code != expected or (commit and data.get("hub", {}).get("hub_commit") != commit):
            failures.append(f"pull {source}: exit {code} (want {expected}), "
                            f"{out[-1000:]} {err[-1000:]}")
    code, out, err = run_cli(env, "push-hub", "floor", "acme/exported", "--token", "hf_dummy",
                             "--store", store)
    if code != 2 or "HF_HUB_OFFLINE" not in err:
        failures.append(f"push-hub offline: exit {code} (want 2), {err[-1000:]}")
    return failures


def main() -> int:
    import huggingface_hub

    with tempfile.TemporaryDirectory(prefix="hub-floor-") as tmp:
        failures = check(Path(tmp))
    print(f"huggingface_hub {huggingface_hub.__version__}: "
          + ("ok" if not failures else "FAILED\n" + "\n".join(failures)))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
