"""Fuzzing safetensors / adapter_config ingestion (issue 6, hardening).

Every generated input must end in a :class:`BadInputError` (exit code 2) or a valid
result, never in another exception, a hang or a memory blow-up; whenever our
reader accepts a file, the reference ``safetensors`` reader must accept it too and
see the same names, dtypes and shapes; a refused ``adapters push`` writes nothing
to the store. Example counts are kept modest so the file runs in well under 30 s;
set ``ADAPTERKIT_FUZZ_EXAMPLES`` for a long randomized run.
"""

from __future__ import annotations

import atexit
import json
import os
import shutil
import struct
import tempfile
import time
import tracemalloc
from pathlib import Path

import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from safetensors import safe_open  # noqa: E402

from registry.errors import BadInputError  # noqa: E402
from registry.formats.fingerprint import hash_tensors  # noqa: E402
from registry.formats.dtypes import DTYPE_BITS  # noqa: E402
from registry.formats.safetensors_header import read_header  # noqa: E402
from tests.support.ingest import handmade_adapter, small_valid_file  # noqa: E402
from tests.support.safetensors_files import raw_safetensors  # noqa: E402

# ADAPTERKIT_FUZZ_EXAMPLES=20000 runs a long, randomized campaign; the default is a
# small deterministic one for CI.
_LONG = int(os.environ.get("ADAPTERKIT_FUZZ_EXAMPLES", "0"))
FUZZ = settings(
    max_examples=_LONG or 150,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
    derandomize=not _LONG,
)
_ADAPTER_EXAMPLES = _LONG or 120
_SCRATCH = Path(tempfile.mkdtemp(prefix="adapterkit-fuzz-"))
atexit.register(shutil.rmtree, _SCRATCH, True)  # also when no test of this file runs


def _reference(path: Path):
    with safe_open(str(path), framework="numpy") as f:
        return {k: (f.get_slice(k).get_dtype(), tuple(f.get_slice(k).get_shape())) for k in f.keys()}


def check_bytes(data: bytes) -> bool:
    """Read ``data`` as a file: BadInputError or a header safetensors agrees with."""
    path = _SCRATCH / "fuzz.safetensors"
    path.write_bytes(data)
    try:
        header = read_header(path)
    except BadInputError as exc:
        assert exc.exit_code == 2 and "\n" not in exc.message and exc.fix
        return False
    ours = {k: (v.dtype, v.shape) for k, v in header.tensors.items()}
    assert ours == _reference(path), "accepted a file the reference reader sees differently"
    digests = hash_tensors(path, header)
    assert digests.keys() == header.tensors.keys()
    return True


# --- valid seeds ------------------------------------------------------------------------

SEEDS = [small_valid_file()]
try:  # a file written by safetensors itself, when numpy is around
    import numpy as np
    from safetensors.numpy import save as np_save

    SEEDS.append(
        np_save(
            {"w": np.arange(6, dtype=np.float32).reshape(2, 3), "e": np.zeros((0, 2), np.float16)},
            metadata={"format": "np"},
        )
    )
except ImportError:  # pragma: no cover
    pass


def test_seeds_are_valid():
    assert all(check_bytes(seed) for seed in SEEDS)


@FUZZ
@given(seed=st.sampled_from(SEEDS), data=st.data())
def test_truncated_files(seed, data):
    cut = data.draw(st.integers(0, len(seed) - 1))
    assert not check_bytes(seed[:cut])


@FUZZ
@given(seed=st.sampled_from(SEEDS), length=st.one_of(st.integers(0, 4096), st.integers(0, 2**64 - 1)))
def test_header_length_field(seed, length):
    check_bytes(raw_safetensors(seed[8:], length=length))


names = st.one_of(
    st.text(min_size=0, max_size=12),
    st.sampled_from(["a", "b.weight", "model.layers.0.self_attn.q_proj.lora_A.weight", "__metadata__"]),
)
dtypes = st.one_of(st.sampled_from(sorted(DTYPE_BITS)), st.text(max_size=6), st.integers(), st.none())
dims = st.one_of(st.integers(0, 5), st.integers(-3, 2**70), st.sampled_from([2**32, 2**63, 2**64]))
shapes = st.one_of(st.lists(dims, max_size=4), st.integers(), st.text(max_size=3))
offsets = st.one_of(
    st.lists(st.one_of(st.integers(-2, 64), st.integers(0, 2**65)), min_size=0, max_size=3),
    st.none(),
)


@st.composite
def random_headers(draw):
    """A well-formed layout, then zero to three perturbations of dtypes, shapes, offsets, size."""
    header: dict = {}
    offset = 0
    for name in draw(st.lists(names, max_size=4, unique=True)):
        dtype = draw(st.sampled_from(sorted(DTYPE_BITS)))
        shape = draw(st.lists(st.integers(0, 3), max_size=3))
        nbits = DTYPE_BITS[dtype]
        for d in shape:
            nbits *= d
        if nbits % 8:
            shape = [*shape, 2]
            nbits *= 2
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + nbits // 8]}
        offset += nbits // 8
    data_len = offset
    for _ in range(draw(st.integers(0, 3))):
        field = draw(st.sampled_from(["dtype", "shape", "data_offsets", "size", "entry"]))
        if field == "size":
            data_len = draw(st.integers(0, 64))
        elif header:
            entry = header[draw(st.sampled_from(sorted(header)))]
            if field == "entry":
                entry[draw(st.sampled_from(["extra", "shape", "dtype"]))] = draw(st.integers())
            else:
                entry[field] = draw({"dtype": dtypes, "shape": shapes, "data_offsets": offsets}[field])
    return header, data_len


@FUZZ
@given(layout=random_headers())
def test_random_dtypes_shapes_and_offsets(layout):
    header, data_len = layout
    check_bytes(raw_safetensors(header, b"\x00" * data_len))


@FUZZ
@given(
    tensor_map=st.dictionaries(
        st.one_of(st.binary(max_size=8), st.sampled_from([b"\xff", b"\xc3(", b"\\udc80x", b"\\ud83d\\ude00"])),
        st.sampled_from(sorted(DTYPE_BITS)),
        max_size=3,
    ),
)
def test_non_utf8_and_escaped_names(tensor_map):
    entries = [
        b'"' + raw_name + b'":{"dtype":"' + dtype.encode() + b'","shape":[0],"data_offsets":[0,0]}'
        for raw_name, dtype in tensor_map.items()
    ]
    accepted = check_bytes(raw_safetensors(b"{" + b",".join(entries) + b"}"))
    if any(b"\xff" in name or b"\\udc80" in name for name in tensor_map):
        assert not accepted


@FUZZ
@given(
    seed=st.sampled_from(SEEDS),
    edits=st.lists(
        st.tuples(st.sampled_from(["flip", "set", "insert", "delete"]), st.integers(0, 10**6), st.integers(0, 255)),
        min_size=1,
        max_size=6,
    ),
)
def test_random_byte_mutations(seed, edits):
    data = bytearray(seed)
    for op, pos, value in edits:
        if not data:
            break
        pos %= len(data)
        if op == "flip":
            data[pos] ^= 1 << (value % 8)
        elif op == "set":
            data[pos] = value
        elif op == "insert":
            data.insert(pos, value)
        else:
            del data[pos]
    check_bytes(bytes(data))


# --- JSON bombs: refused fast and with bounded memory -------------------------------------

BOMBS = {
    "deep_arrays": lambda n: b'{"a":' + b"[" * n + b"]" * n + b"}",
    "deep_objects": lambda n: b'{"a":' + b'{"a":' * n + b"1" + b"}" * n + b"}",
    "wide_shape": lambda n: b'{"a":{"dtype":"U8","shape":[' + b"1," * n + b'1],"data_offsets":[0,1]}}',
    "many_tensors": lambda n: b"{"
    + b",".join(b'"t%d":{"dtype":"U8","shape":[0],"data_offsets":[0,0]}' % i for i in range(n))
    + b"}",
    "long_digits": lambda n: b'{"a":{"dtype":"U8","shape":[' + b"7" * n + b'],"data_offsets":[0,1]}}',
    "long_name": lambda n: b'{"' + b"x" * n + b'":1}',
    "long_dtype": lambda n: b'{"a":{"dtype":"' + b"\\u0041" * n + b'","shape":[1],"data_offsets":[0,1]}}',
    "many_metadata": lambda n: b'{"__metadata__":{' + b",".join(b'"k%d":"v"' % i for i in range(n)) + b"}}",
}
LIMIT = 10_000  # max_tensors for the bomb tests: the byte-count caps scale with it


def _measure(payload: bytes, **kwargs):
    path = _SCRATCH / "bomb.safetensors"
    path.write_bytes(raw_safetensors(payload))
    tracemalloc.start()
    started = time.perf_counter()
    try:
        try:
            outcome = read_header(path, **kwargs)
        except BadInputError as exc:
            outcome = exc
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return outcome, peak, time.perf_counter() - started


@pytest.mark.parametrize("bomb", sorted(BOMBS))
def test_json_bombs_are_refused_with_bounded_memory_and_time(bomb):
    payload = BOMBS[bomb](20 * LIMIT)
    outcome, peak, elapsed = _measure(payload, max_tensors=LIMIT)
    assert isinstance(outcome, BadInputError), bomb
    # the header bytes are read and decoded once; no tree of millions of nodes is built
    assert peak < 4 * len(payload) + 16 * 2**20, (bomb, len(payload), peak)
    assert elapsed < 5, (bomb, elapsed)


@pytest.mark.parametrize("bomb", ["many_tensors", "many_metadata", "wide_shape"])
def test_headers_just_under_the_caps_parse_in_bounded_memory(bomb):
    payload = BOMBS[bomb](LIMIT - 10)
    _, peak, elapsed = _measure(payload, max_tensors=LIMIT)
    assert peak < 16 * len(payload) + 16 * 2**20, (bomb, len(payload), peak)
    assert elapsed < 5, (bomb, elapsed)


def test_spec_sized_bomb_is_refused_before_decoding():
    payload = b'{"a":[' + b"0," * 20_000_000 + b"0]}"  # 40 MB, under the 100 MB header cap
    outcome, peak, elapsed = _measure(payload)
    assert isinstance(outcome, BadInputError) and "too many" in outcome.message
    assert peak < 1.5 * len(payload), peak
    assert elapsed < 5, elapsed


# --- adapter directories: config and weights ------------------------------------------------

json_values = st.recursive(
    st.one_of(
        st.none(),
        st.booleans(),
        st.integers(-(2**70), 2**70),
        st.sampled_from([10**400, -(10**400), 2**1024]),
        st.floats(allow_nan=False),
        st.text(max_size=8),
    ),
    lambda children: st.one_of(st.lists(children, max_size=3), st.dictionaries(st.text(max_size=6), children, max_size=3)),
    max_leaves=8,
)
CONFIG_FIELDS = [
    "peft_type", "r", "lora_alpha", "target_modules", "rank_pattern", "alpha_pattern",
    "use_rslora", "use_dora", "modules_to_save", "bias", "lora_dropout", "task_type",
    "fan_in_fan_out", "lora_bias", "base_model_name_or_path",
]


@pytest.fixture(scope="module")
def adapter_seed():
    # hand-made (same keys, shapes and config as peft writes) so this file needs no torch
    adapter = handmade_adapter(_SCRATCH / "seed-adapter")
    assert _prepare(adapter)
    return adapter


def _prepare(adapter: Path):
    from registry.ingest import prepare_adapter
    from registry.record import build_record

    try:
        prepared = prepare_adapter(adapter)
        build_record(prepared.peft_config, prepared.tensors)
    except BadInputError as exc:  # includes Unsupported/BaseMismatch
        assert exc.exit_code == 2 and "\n" not in exc.message
        return False
    return True


def _fresh_copy(seed: Path) -> Path:
    target = _SCRATCH / "adapter"
    shutil.rmtree(target, ignore_errors=True)
    shutil.copytree(seed, target)
    return target


@settings(FUZZ, max_examples=_ADAPTER_EXAMPLES)
@given(changes=st.dictionaries(st.sampled_from(CONFIG_FIELDS), json_values, min_size=1, max_size=4))
def test_config_field_mutations(adapter_seed, changes):
    adapter = _fresh_copy(adapter_seed)
    config = json.loads((adapter / "adapter_config.json").read_text())
    config.update(changes)
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    _prepare(adapter)


@settings(FUZZ, max_examples=_ADAPTER_EXAMPLES)
@given(data=st.data())
def test_config_byte_mutations(adapter_seed, data):
    adapter = _fresh_copy(adapter_seed)
    raw = bytearray((adapter / "adapter_config.json").read_bytes())
    for _ in range(data.draw(st.integers(1, 4))):
        raw[data.draw(st.integers(0, len(raw) - 1))] = data.draw(st.integers(0, 255))
    (adapter / "adapter_config.json").write_bytes(bytes(raw))
    _prepare(adapter)


@settings(FUZZ, max_examples=_ADAPTER_EXAMPLES)
@given(data=st.data())
def test_adapter_weight_mutations(adapter_seed, data):
    adapter = _fresh_copy(adapter_seed)
    path = adapter / "adapter_model.safetensors"
    raw = bytearray(path.read_bytes())
    (n,) = struct.unpack("<Q", raw[:8])
    for _ in range(data.draw(st.integers(1, 4))):
        # mostly inside the header, where the structure lives
        pos = data.draw(st.one_of(st.integers(0, 8 + n - 1), st.integers(0, len(raw) - 1)))
        raw[pos] = data.draw(st.integers(0, 255))
    if data.draw(st.booleans()):
        raw = raw[: data.draw(st.integers(0, len(raw)))]
    path.write_bytes(bytes(raw))
    _prepare(adapter)


def test_refused_push_writes_nothing_to_the_store(adapter_seed, tmp_path):
    """End to end through the CLI: a refused push exits 2 and leaves the store unchanged."""
    try:
        from cli.main import main
    except ImportError:  # pragma: no cover - CLI not assembled yet
        pytest.skip("cli.main not available")
    store = tmp_path / "store"
    assert main(["init", "--store", str(store)]) == 0

    def snapshot():
        return sorted(
            (str(p.relative_to(store)), p.stat().st_size) for p in store.rglob("*") if p.is_file()
        )

    before = snapshot()
    cases = {
        "truncated": lambda a: (a / "adapter_model.safetensors").write_bytes(
            (a / "adapter_model.safetensors").read_bytes()[:-1]
        ),
        "header_len": lambda a: (a / "adapter_model.safetensors").write_bytes(
            b"\xff" * 8 + (a / "adapter_model.safetensors").read_bytes()[8:]
        ),
        "json_bomb_config": lambda a: (a / "adapter_config.json").write_text("[" * 50_000 + "]" * 50_000),
        "bad_rank": lambda a: (a / "adapter_config.json").write_text(
            json.dumps({**json.loads((a / "adapter_config.json").read_text()), "r": 3})
        ),
        "pickle_only": lambda a: (a / "adapter_model.safetensors").rename(a / "adapter_model.bin"),
    }
    for case, damage in cases.items():
        adapter = tmp_path / case
        shutil.copytree(adapter_seed, adapter)
        damage(adapter)
        code = main(["push", str(adapter), "--name", "fuzz", "--store", str(store)])
        assert code == 2, case
        assert snapshot() == before, case
