"""Lineage: validation, up/down queries over a diamond, and tree/JSON/DOT rendering."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from registry.errors import BadInputError
from registry.lineage import (ancestors, descendants, lineage_tree, make_lineage, parent, to_dot,
                              to_json, validate_lineage)
from registry.storage.store import Store
from tests.support.registry import (adapter_files, make_adapter_dir, new_store, push_adapter,
                                     sample_record)


@pytest.fixture()
def diamond(tmp_path: Path) -> tuple[Store, dict]:
    """a, b trained; m = ties(a, b); n = linear(m, a)."""
    store = new_store(tmp_path)
    a = push_adapter(store, "a", make_adapter_dir(tmp_path / "a", seed=1)).version
    b = push_adapter(store, "b", make_adapter_dir(tmp_path / "b", seed=2)).version
    mdir = make_adapter_dir(tmp_path / "m", seed=3)
    m = store.push("m", adapter_files(mdir), sample_record(mdir),
                   lineage=make_lineage([parent(a, weight=0.7), parent(b, weight=0.3)],
                                        method="ties", parameters={"density": 0.5},
                                        report={"max_rel_error": 0.01})).version
    ndir = make_adapter_dir(tmp_path / "n", seed=4)
    n = store.push("n", adapter_files(ndir), sample_record(ndir),
                   lineage=make_lineage([parent(m), parent(a, role="anchor")],
                                        method="linear")).version
    return store, {"a": a, "b": b, "m": m, "n": n}


def test_validate_lineage_normalises() -> None:
    digest = "sha256:" + "a" * 64
    out = validate_lineage({"parents": [{"digest": digest}], "recipe": {"method": "ties"}})
    assert out is not None
    assert out["parents"] == [{"digest": digest, "ref": None, "role": "input", "weight": None}]
    assert out["recipe"]["tool"] == "adapterkit" and out["recipe"]["parameters"] == {}
    assert out["report"] is None
    assert validate_lineage(None) is None


@pytest.mark.parametrize("bad,needle", [
    ([], "lineage.(root)"),
    ({"parents": {}}, "lineage.parents"),
    ({"parents": [{"digest": "sha1:x"}]}, "lineage.parents[0].digest"),
    ({"parents": [{"digest": "sha256:" + "a" * 64, "weight": "half"}]},
     "lineage.parents[0].weight"),
    ({"parents": [{"digest": "sha256:" + "a" * 64, "extra": 1}]}, "lineage.parents[0].extra"),
    ({"recipe": {"parameters": {}}}, "lineage.recipe.method"),
    ({"recipe": {"method": "ties", "parameters": []}}, "lineage.recipe.parameters"),
    ({"report": [1]}, "lineage.report"),
    ({"report": {"x": float("nan")}}, "lineage.(root)"),
    ({"children": []}, "lineage.children"),
])
def test_validate_lineage_errors(bad: object, needle: str) -> None:
    with pytest.raises(BadInputError) as err:
        validate_lineage(bad)  # type: ignore[arg-type]
    assert needle in err.value.message


def test_lineage_is_part_of_the_manifest(diamond: tuple[Store, dict]) -> None:
    store, v = diamond
    lineage = store.resolve("m").lineage
    assert lineage is not None
    assert [p["digest"] for p in lineage["parents"]] == [v["a"].digest, v["b"].digest]
    assert lineage["recipe"]["method"] == "ties" and lineage["report"] == {"max_rel_error": 0.01}


def test_ancestors(diamond: tuple[Store, dict]) -> None:
    store, v = diamond
    tree = ancestors(store, "n")
    assert tree.name == "n" and tree.method == "linear"
    assert [(c.name, c.role) for c in tree.children] == [("m", "input"), ("a", "anchor")]
    m = tree.children[0]
    assert [(c.name, c.weight) for c in m.children] == [("a", 0.7), ("b", 0.3)]
    assert not m.children[0].repeated and tree.children[1].repeated  # a reached twice
    assert ancestors(store, "n", max_depth=1).children[0].children == ()


def test_descendants(diamond: tuple[Store, dict]) -> None:
    store, v = diamond
    tree = descendants(store, "a")
    assert tree.name == "a"
    assert [c.name for c in tree.children] == ["m", "n"]
    assert [c.name for c in tree.children[0].children] == ["n"]
    assert tree.children[1].repeated
    assert descendants(store, "n").children == ()
    assert lineage_tree(store, "b", "down").children[0].name == "m"
    with pytest.raises(BadInputError):
        lineage_tree(store, "b", "sideways")


def test_renderings(diamond: tuple[Store, dict]) -> None:
    store, v = diamond
    tree = ancestors(store, "m")
    data = to_json(tree)
    assert data["name"] == "m" and [c["name"] for c in data["children"]] == ["a", "b"]
    assert data["children"][0]["weight"] == 0.7
    dot = to_dot(tree)
    assert dot.startswith("digraph lineage {") and dot.rstrip().endswith("}")
    assert f'"{v["a"].digest}" -> "{v["m"].digest}" [label="input w=0.7"];' in dot
    down = to_dot(descendants(store, "a"), "down")
    assert f'"{v["a"].digest}" -> "{v["m"].digest}"' in down
    assert f'"{v["m"].digest}" -> "{v["n"].digest}"' in down


def test_missing_parent_manifest_is_marked(diamond: tuple[Store, dict]) -> None:
    store, v = diamond
    store.delete_version(v["b"].ref)
    path = store.blobs.path(v["b"].digest)
    os.chmod(path, 0o644)
    path.unlink()
    tree = ancestors(store, "m")
    assert tree.children[1].missing and tree.children[1].name is None
    assert to_json(tree)["children"][1]["missing"] and "(missing)" in to_dot(tree)
