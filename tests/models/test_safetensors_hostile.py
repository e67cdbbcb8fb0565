"""Crafted safetensors files and index.json files are refused, each with one line naming the file and
the tensor, without allocating what the file claims (issue 18).

Every malformed file is built from a valid one written by `safetensors.numpy.save_file`, then edited.
Where the safetensors library (the Rust crate behind transformers' loading) refuses the same file,
the test checks that too: jaxft must be at least as strict. The few cases marked `rust=False` are
files the library accepts and jaxft refuses on purpose (the reason is given beside each).
"""

import copy
import dataclasses
import json
import os
import shutil
import struct
import tracemalloc
from typing import Any, Callable

import numpy as np
import pytest
from safetensors import SafetensorError
from safetensors.numpy import load_file, save_file

import jaxft
from jaxft import hf
from jaxft.testing import tiny_hf_model

# These files are a few hundred bytes: any allocation near this means a length or shape from the file
# was trusted. (Far below the 100 MB the issue allows, so that a trusted 99 MB header length shows.)
MEMORY_LIMIT = 16 * 2**20


def _base(folder) -> tuple[dict, bytes]:
    """A valid file's header (as a dict) and data region. save_file orders the data by dtype
    alignment: b [0, 32) I64 [4], a [32, 56) F32 [2, 3], c [56, 62) F16 [3]."""
    path = os.path.join(folder, "base.safetensors")
    save_file({"a": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.arange(4, dtype=np.int64),
               "c": np.ones(3, np.float16)}, path, metadata={"format": "pt"})
    raw = open(path, "rb").read()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    assert header["b"]["data_offsets"] == [0, 32] and header["a"]["data_offsets"] == [32, 56]
    assert header["c"]["data_offsets"] == [56, 62] and len(raw) == 8 + n + 62
    os.remove(path)
    return header, raw[8 + n:]


def _encode(header: dict | str | bytes) -> bytes:
    if isinstance(header, dict):
        header = json.dumps(header)
    if isinstance(header, str):
        header = header.encode()
    return header + b" " * (-len(header) % 8)


def _file(header: dict | str | bytes, data: bytes, length: int | None = None) -> bytes:
    encoded = _encode(header)
    return struct.pack("<Q", len(encoded) if length is None else length) + encoded + data


def _edit(**tensors: Any) -> Callable[[dict, bytes], bytes]:
    """A builder that replaces fields of tensor entries (None deletes the field, or the entry)."""
    def build(header: dict, data: bytes) -> bytes:
        for key, fields in tensors.items():
            if fields is None:
                del header[key]
            elif not isinstance(fields, dict):
                header[key] = fields
            else:
                header.setdefault(key, {})
                for field, value in fields.items():
                    if value is None:
                        header[key].pop(field, None)
                    else:
                        header[key][field] = value
        return _file(header, data)
    return build


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    build: Callable[[dict, bytes], bytes]
    key: str | None  # the tensor the message must name
    says: tuple[str, ...] = ()  # and what else it must say: the numbers that show the problem
    rust: bool = True  # the safetensors library refuses it too


def _nested(h, d):
    return _file('{"a":' + "[" * 100_000 + "]" * 100_000 + "}", b"")


def _duplicate_key(h, d):
    # Python's json keeps the last "a": here an alias of b's bytes.
    text = json.dumps(h)[:-1] + ', "a": {"dtype": "I64", "shape": [4], "data_offsets": [0, 32]}}'
    return _file(text, d)


def _lone_surrogate(h, d):
    h["\ud800"] = h.pop("c")  # json.dumps writes it as the escape "\ud800", which is not UTF-8
    return _file(h, d)


CASES = [
    # The 8-byte length and the header bytes.
    Case("empty_file", lambda h, d: b"", None),
    Case("shorter_than_8_bytes", lambda h, d: b"\x10\x00\x00", None),
    Case("header_length_past_end_of_file", lambda h, d: _file(h, d, length=99_000_000), None, ("99000000", "302")),
    Case("header_length_over_limit", lambda h, d: _file(h, d, length=100_000_001), None, ("100000001", "100000000")),
    Case("header_length_2_64", lambda h, d: _file(h, d, length=2**64 - 1), None),
    Case("header_not_utf8", lambda h, d: _file(_encode(h).replace(b'"a"', b'"a\xff"'), d), None, ("UTF-8",)),
    Case("header_utf16", lambda h, d: _file(json.dumps(h).encode("utf-16-le"), d), None),
    Case("header_not_json", lambda h, d: _file("{not json}", d), None),
    Case("header_nul_padded", lambda h, d: _file(json.dumps(h).encode() + b"\0" * 8, d), None),
    Case("header_json_array", lambda h, d: _file("[]", b""), None),
    Case("header_nan", lambda h, d: _file(json.dumps(h).replace("[2, 3]", "[NaN, 3]"), d), None),
    Case("header_nested_100000_deep", _nested, None, ("nests",)),
    # Stricter than the library, which reserves InvalidHeaderStart for this but does not check it yet.
    Case("header_leading_space", lambda h, d: _file(" " + json.dumps(h), d), None, rust=False),
    Case("duplicate_tensor_key", _duplicate_key, "a", ("twice",)),
    Case("key_lone_surrogate", _lone_surrogate, None, ("surrogate",)),
    # Tensor entries.
    Case("tensor_info_not_object", _edit(a="F32"), "a"),
    Case("missing_dtype", _edit(a={"dtype": None}), "a"),
    Case("unknown_dtype", _edit(a={"dtype": "F128"}), "a", ("F128",)),
    Case("dtype_not_string", _edit(a={"dtype": ["F32"]}), "a"),
    # Stricter: the library ignores unknown fields; a misspelt or extra field is refused here.
    Case("extra_field", _edit(a={"offset_hint": 0}), "a", rust=False),
    Case("shape_not_list", _edit(a={"shape": 6}), "a"),
    Case("negative_dims", _edit(a={"shape": [-2, -3]}), "a"),
    Case("float_dims", _edit(a={"shape": [2.0, 3.0]}), "a"),
    Case("bool_dim", _edit(a={"shape": [True, 6]}), "a"),
    # Stricter: numpy arrays have at most 64 dimensions.
    Case("too_many_dims", _edit(a={"shape": [1] * 99 + [6]}), "a", rust=False),
    Case("shape_product_overflows", _edit(a={"dtype": "U8", "shape": [8, 2**61 + 3]}), "a", ("overflow",)),
    Case("offsets_wrong_length", _edit(a={"data_offsets": [32, 56, 56]}), "a"),
    Case("offsets_not_ints", _edit(a={"data_offsets": [32.0, 56.0]}), "a"),
    Case("offsets_negative", _edit(a={"data_offsets": [-24, 0]}), "a"),
    Case("begin_after_end", _edit(a={"data_offsets": [56, 32]}), "a"),
    Case("byte_count_mismatch", _edit(a={"shape": [2, 2]}), "a", ("[2, 2]", "F32", "16", "24")),
    # Where the bytes are.
    Case("end_past_data_region", _edit(c={"data_offsets": [62, 68]}), "c", ("[62, 68]", "past the data region of 62")),
    Case("huge_tensor_past_end", _edit(big={"dtype": "F32", "shape": [50_000_000],
                                            "data_offsets": [62, 200_000_062]}), "big", ("200000062",)),
    Case("overlapping_tensors", _edit(a={"data_offsets": [24, 48]}), "a", ("[24, 48]", "overlap", "'b' [0, 32]")),
    Case("aliased_tensors", _edit(a={"dtype": "I64", "shape": [4], "data_offsets": [0, 32]}), "a", ("overlap", "'b'")),
    Case("gap_between_tensors", _edit(a=None), "c", ("[32, 56)",)),
    Case("trailing_bytes", lambda h, d: _file(h, d + b"\0" * 8), None, ("70 bytes", "[0, 62)")),
    # __metadata__.
    Case("metadata_value_not_string", _edit(__metadata__={"format": 1}), "__metadata__"),
    Case("metadata_not_object", _edit(__metadata__="pt"), "__metadata__"),
]


def _refusal(folder, limit: int = MEMORY_LIMIT, load: Callable | None = None) -> str:
    """The ValueError that loading every tensor of `folder` ends in; the traced peak stays under limit."""
    def read_everything():
        with hf.Checkpoint(os.fspath(folder)) as checkpoint:
            for key in checkpoint.shapes:
                checkpoint.read(key)

    tracemalloc.start()
    try:
        error = None
        try:
            (load or read_everything)()
        except ValueError as e:
            error = e
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < limit, f"loading allocated {peak / 2**20:.0f} MiB"
    assert error is not None, "loaded without an error"
    message = str(error)
    assert "\n" not in message, f"not one line: {message!r}"
    return message


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_malformed_file_is_refused(tmp_path, case):
    header, data = _base(tmp_path)
    folder = tmp_path / "m"
    folder.mkdir()
    path = folder / "model.safetensors"
    path.write_bytes(case.build(copy.deepcopy(header), data))
    message = _refusal(folder)
    assert os.fspath(path) in message, message
    if case.key is not None:
        assert repr(case.key) in message, message
    for part in case.says:
        assert part in message, f"{part!r} not in {message!r}"
    if case.rust:
        with pytest.raises(SafetensorError):
            load_file(path)


def test_distinct_cases(tmp_path):
    header, data = _base(tmp_path)
    built = {case.build(copy.deepcopy(header), data) for case in CASES}
    assert len(built) == len(CASES) >= 20, "two cases build the same file"


# -- index.json ----------------------------------------------------------------------------------

S1, S2 = "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"


def _sharded(folder) -> dict:
    """x, y in shard 1 and z in shard 2, and an index saying so; returns the index."""
    folder.mkdir()
    save_file({"x": np.ones((2, 2), np.float32), "y": np.zeros(3, np.float32)}, folder / S1)
    save_file({"z": np.full(4, 7, np.float32)}, folder / S2)
    return {"metadata": {"total_size": 44}, "weight_map": {"x": S1, "y": S1, "z": S2}}


def _outside(folder, name="evil.safetensors") -> str:
    path = folder.parent / name
    save_file({"z": np.full(4, -1, np.float32)}, path)
    return os.fspath(path)


def _in_subfolder(folder) -> str:
    (folder / "sub").mkdir()
    save_file({"z": np.full(4, -1, np.float32)}, folder / "sub" / "z.safetensors")
    return "sub/z.safetensors"


def _remap(**changes) -> Callable:
    """An index edit: tensor -> shard name (or a function of the folder that returns one)."""
    def edit(index: dict, folder) -> dict:
        index["weight_map"].update({k: v(folder) if callable(v) else v for k, v in changes.items()})
        return index
    return edit


INDEX_CASES = {
    # name: (edit(index, folder) -> index or raw text, tensor the message names)
    "shard_outside_folder": (_remap(z=lambda f: "../" + os.path.basename(_outside(f))), "z"),
    "shard_absolute_path": (_remap(z=lambda f: _outside(f, "abs.safetensors")), "z"),
    "shard_in_subfolder": (_remap(z=_in_subfolder), "z"),
    "shard_missing": (_remap(z="model-00003-of-00003.safetensors"), "z"),
    "tensor_not_in_any_shard": (_remap(w=S1), "w"),
    "tensor_in_another_shard": (_remap(x=S2), "x"),
    "shard_name_not_string": (_remap(z=2), "z"),
    "weight_map_not_object": (lambda ix, f: {"weight_map": [S1, S2]}, None),
    "weight_map_missing": (lambda ix, f: {"metadata": {}}, None),
    "weight_map_empty": (lambda ix, f: {"weight_map": {}}, None),
    "index_not_json": (lambda ix, f: '{"weight_map": {', None),
    "index_json_array": (lambda ix, f: "[]", None),
    # Python keeps the last "z" (the right shard); a loader keeping the first would read another file.
    "index_duplicate_key": (lambda ix, f: '{"weight_map": {"x": "%s", "y": "%s", "z": "%s", "z": "%s"}}'
                                          % (S1, S1, S1, S2), "z"),
}


@pytest.mark.parametrize("name", list(INDEX_CASES))
def test_malformed_index_is_refused(tmp_path, name):
    edit, key = INDEX_CASES[name]
    folder = tmp_path / "m"
    index = edit(_sharded(folder), folder)
    path = folder / hf.SAFETENSORS_INDEX
    path.write_text(index if isinstance(index, str) else json.dumps(index))
    message = _refusal(folder)
    assert os.fspath(path) in message, message
    if key is not None:
        assert repr(key) in message, message


def test_weights_path_that_is_not_a_file(tmp_path):
    folder = tmp_path / "m"
    (folder / "model.safetensors").mkdir(parents=True)
    assert os.fspath(folder / "model.safetensors") in _refusal(folder)


def test_bad_shard_is_named(tmp_path):
    folder = tmp_path / "m"
    index = _sharded(folder)
    (folder / hf.SAFETENSORS_INDEX).write_text(json.dumps(index))
    raw = (folder / S2).read_bytes()
    (folder / S2).write_bytes(raw[:-4])  # z's last element cut off
    message = _refusal(folder)
    assert os.fspath(folder / S2) in message and "'z'" in message, message


# -- what is valid stays valid -------------------------------------------------------------------

def _valid_variants(h, d) -> dict[str, bytes]:
    reordered = {k: h[k] for k in ("c", "__metadata__", "a", "b")}
    no_meta = {k: v for k, v in h.items() if k != "__metadata__"}
    as_u16 = copy.deepcopy(h)
    as_u16["a"].update(dtype="U16", shape=[12])
    empty_and_zero = copy.deepcopy(h)
    empty_and_zero["z"] = {"dtype": "F32", "shape": [0, 3], "data_offsets": [32, 32]}
    return {
        "as_written": _file(h, d),
        "keys_not_in_offset_order": _file(reordered, d),
        "no_metadata": _file(no_meta, d),
        "null_metadata": _file({**h, "__metadata__": None}, d),
        "empty_metadata": _file({**h, "__metadata__": {}}, d),
        "extra_padding": _file(json.dumps(h) + " " * 64, d),
        "u16": _file(as_u16, d),
        "zero_size_tensor_between": _file(empty_and_zero, d),
        "no_tensors": _file({}, b""),
    }


def test_valid_variants_load_as_the_library_loads_them(tmp_path):
    header, data = _base(tmp_path)
    save_file({"scalar": np.array(3.5, np.float32), "empty": np.zeros((0, 3), np.float16)},
              tmp_path / "scalar.safetensors")
    variants = {**_valid_variants(header, data), "scalar_and_empty": (tmp_path / "scalar.safetensors").read_bytes()}
    for name, raw in variants.items():
        folder = tmp_path / name
        folder.mkdir()
        (folder / "model.safetensors").write_bytes(raw)
        expected = load_file(folder / "model.safetensors")
        with hf.Checkpoint(os.fspath(folder)) as checkpoint:
            assert sorted(checkpoint.shapes) == sorted(expected), name
            for key, array in expected.items():
                got = checkpoint.read(key)
                assert got.dtype == array.dtype and got.shape == array.shape, (name, key)
                np.testing.assert_array_equal(got, array, err_msg=f"{name}: {key}")


def test_our_writer_reads_back(tmp_path):
    entries = [("w", (3, 4), np.float32, lambda: np.arange(12, dtype=np.float32).reshape(3, 4)),
               ("v", (5,), np.int32, lambda: np.arange(5, dtype=np.int32))]
    (tmp_path / "m").mkdir()
    hf.write_safetensors(os.fspath(tmp_path / "m" / "model.safetensors"), entries)
    with hf.Checkpoint(os.fspath(tmp_path / "m")) as checkpoint:
        np.testing.assert_array_equal(checkpoint.read("w"), np.arange(12, dtype=np.float32).reshape(3, 4))
        np.testing.assert_array_equal(checkpoint.read("v", (slice(1, 4),)), [1, 2, 3])


# -- the public path: from_pretrained on a corrupted tiny Llama -----------------------------------

@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    folder = tiny_hf_model(tmp_path_factory.mktemp("llama"), "llama3_rope")[0]
    jaxft.from_pretrained(folder)  # uncorrupted, it loads (and JAX is warm before tracemalloc slows it down)
    return folder


def _corrupt(src: str, dst, edit: Callable[[dict, bytes], tuple[dict, bytes]]) -> str:
    shutil.copytree(src, dst)
    path = os.path.join(dst, "model.safetensors")
    raw = open(path, "rb").read()
    (n,) = struct.unpack("<Q", raw[:8])
    header, data = edit(json.loads(raw[8:8 + n]), raw[8 + n:])
    with open(path, "wb") as f:
        f.write(_file(header, data))
    return os.fspath(dst)


def _alias_layers(header, data):
    # Layer 1's up_proj pointed at layer 0's bytes: same shape, so only the offsets check sees it.
    key0, key1 = "model.layers.0.mlp.up_proj.weight", "model.layers.1.mlp.up_proj.weight"
    assert header[key0]["shape"] == header[key1]["shape"]
    header[key1]["data_offsets"] = header[key0]["data_offsets"]
    return header, data


def _truncate(header, data):
    return header, data[:-256]


@pytest.mark.parametrize("edit,key", [(_alias_layers, "model.layers.1.mlp.up_proj.weight"), (_truncate, None)],
                         ids=["aliased_layers", "truncated_file"])
def test_from_pretrained_refuses_a_corrupted_model(llama, tmp_path, edit, key):
    folder = _corrupt(llama, tmp_path / "m", edit)
    message = _refusal(folder, limit=100 * 2**20, load=lambda: jaxft.from_pretrained(folder))
    assert os.path.join(folder, "model.safetensors") in message, message
    if key is not None:
        assert repr(key) in message, message
