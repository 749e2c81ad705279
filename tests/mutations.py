"""Named ways to damage a file, for tests/hostile.py: ``mutation(data, rng, ctx) -> bytes``.

Generic byte damage (truncation, bit flips, insertions, junk), format surgery (safetensors headers,
JSON trees, IDX headers, gzip streams, CIFAR pickles, PNG headers), self-consistent hostile files
(a digest recomputed over changed tensors) and pickles whose code would create ``ctx.sentinel``.
"""
from __future__ import annotations

import gzip
import io
import json
import pickle
import random
import zipfile
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save


class _Payload:
    """Unpickling this creates the sentinel file: proof that a reader ran a file's code."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


# ---- generic byte mutations -------------------------------------------------------------------

def _pos(data: bytes, rng: random.Random) -> int:
    return rng.randrange(max(1, len(data)))


def truncate(data, rng, ctx):
    return data[:_pos(data, rng)]


def flip_bits(data, rng, ctx):
    b = bytearray(data)
    for _ in range(rng.randint(1, 8)):
        i = rng.randrange(len(b) * 8)
        b[i // 8] ^= 1 << (i % 8)
    return bytes(b)


def flip_head_bits(data, rng, ctx):
    """Bit flips in the first 512 bytes, where headers (and so structure) live."""
    b = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        i = rng.randrange(min(len(b), 512) * 8)
        b[i // 8] ^= 1 << (i % 8)
    return bytes(b)


def overwrite_run(data, rng, ctx):
    i = _pos(data, rng)
    n = rng.randint(1, 64)
    return data[:i] + rng.randbytes(n) + data[i + n:]


def insert_bytes(data, rng, ctx):
    i = _pos(data, rng)
    return data[:i] + rng.randbytes(rng.randint(1, 64)) + data[i:]


def delete_range(data, rng, ctx):
    i = _pos(data, rng)
    return data[:i] + data[i + rng.randint(1, 256):]


def append_junk(data, rng, ctx):
    return data + rng.randbytes(rng.randint(1, 4096))


def empty_file(data, rng, ctx):
    return b""


def random_file(data, rng, ctx):
    return rng.randbytes(rng.randint(1, 8192))


def pickle_payload(data, rng, ctx):
    return pickle.dumps({"weights": _Payload(ctx.sentinel)}, protocol=rng.randint(0, 5))


def torch_save_payload(data, rng, ctx):
    """A torch.save zip archive whose pickle carries code (what a malicious .pt/.pth looks like)."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("archive/data.pkl", pickle.dumps({"w": _Payload(ctx.sentinel)}, protocol=2))
        z.writestr("archive/version", "3\n")
    return buf.getvalue()


BYTES = {f.__name__: f for f in (truncate, flip_bits, flip_head_bits, overwrite_run, insert_bytes, delete_range,
                                 append_junk, empty_file, random_file, pickle_payload, torch_save_payload)}


# ---- safetensors mutations (model.safetensors, train_state.safetensors) -------------------------

def _st_split(data: bytes) -> tuple[dict, bytes]:
    n = int.from_bytes(data[:8], "little")
    return json.loads(data[8:8 + n]), data[8 + n:]


def _st_join(header: Any, body: bytes) -> bytes:
    h = json.dumps(header).encode()
    return len(h).to_bytes(8, "little") + h + body


def _entry(header: dict, rng) -> str:
    return rng.choice(sorted(k for k in header if k != "__metadata__"))


JUNK = [None, True, 0, -1, 7, 2**31, 2**63, 2**70, -2**70, 1.5, 1e308, -1e308, "", "x", "a" * 300, "NaN", [], [1],
        [-1, 5], [2**40, 2**40], {}, {"a": 1}, [[1, [2, [3]]]]]


def st_header_length(data, rng, ctx):
    n = int.from_bytes(data[:8], "little")
    new = rng.choice([0, 1, 7, n - 1, n + 1, n + 8, len(data), len(data) + 1, 2**31, 2**63 - 1, 2**64 - 1])
    return new.to_bytes(8, "little") + data[8:]


def st_dtype(data, rng, ctx):
    header, body = _st_split(data)
    header[_entry(header, rng)]["dtype"] = rng.choice(
        ["F16", "BF16", "F64", "I64", "I32", "I16", "I8", "U8", "U16", "BOOL", "F8_E4M3", "F8_E5M2", "C64", "XYZ",
         "", 5, None])
    return _st_join(header, body)


def st_shape(data, rng, ctx):
    header, body = _st_split(data)
    e = header[_entry(header, rng)]
    shape = list(e["shape"])
    e["shape"] = rng.choice([[], [0], [2**40], [-1], shape[::-1], shape + [1], shape[:-1],
                             [s + 1 for s in shape], [2**31] * 4, "abc", [1.5], [[1]], None])
    return _st_join(header, body)


def st_offsets(data, rng, ctx):
    header, body = _st_split(data)
    e = header[_entry(header, rng)]
    a, b = e["data_offsets"]
    other = header[_entry(header, rng)]["data_offsets"]
    e["data_offsets"] = rng.choice([[b, a], [0, 2**62], [-1, b - a - 1], [a, b - 1], [a + 1, b + 1], list(other),
                                    [a, a], [2**64, 2**64 + 4], "0-4", [a]])
    return _st_join(header, body)


def st_entries(data, rng, ctx):
    """Drop, rename or duplicate a header entry (tensor table surgery)."""
    header, body = _st_split(data)
    name = _entry(header, rng)
    how = rng.choice(["drop", "rename", "duplicate", "metadata-entry"])
    if how == "drop":
        del header[name]
    elif how == "rename":
        header[name + rng.choice(["_", ".x", "\u00e9"])] = header.pop(name)
    elif how == "duplicate":
        header[name + ".copy"] = dict(header[name])
    else:
        header["__metadata__"] = header[name]
    return _st_join(header, body)


def st_metadata(data, rng, ctx):
    header, body = _st_split(data)
    meta = header.get("__metadata__") or {}
    how = rng.choice(["junk", "drop", "value", "digest"])
    if how == "junk":
        header["__metadata__"] = rng.choice(JUNK)
    elif how == "drop":
        header.pop("__metadata__", None)
    elif how == "value" and meta:
        meta[rng.choice(sorted(meta))] = rng.choice(["", "0", "-1", "1e9", "abc", "[]", "{}", "null", "2.5", " 3",
                                                      "9" * 40, '{"a": [1, {"b": null}]}', "[" * 5000])
        header["__metadata__"] = meta
    else:
        meta["simprune.sha256"] = rng.choice(["0" * 64, "", "xyz"])
        header["__metadata__"] = meta
    return _st_join(header, body)


def st_header_junk(data, rng, ctx):
    _, body = _st_split(data)
    return _st_join(rng.choice(JUNK), body)


def _tensors_and_meta(data: bytes) -> tuple[dict[str, torch.Tensor], dict]:
    header, _ = _st_split(data)
    return st_load(data), dict(header.get("__metadata__") or {})


def _rewrite(data: bytes, change: Callable[[dict], None], rng, keep_digest: bool | None = None) -> bytes:
    """Re-serialise the file's tensors after ``change``; a hostile writer recomputes the digest."""
    from simprune.io.files import tensors_bytes

    tensors, meta = _tensors_and_meta(data)
    change(tensors)
    meta.pop("simprune.sha256", None)
    digest = rng.random() < 0.5 if keep_digest is None else keep_digest
    return tensors_bytes(tensors, meta) if digest else st_save(tensors, metadata=meta or None)


def _float_key(tensors, rng) -> str:
    return rng.choice(sorted(k for k, v in tensors.items() if v.is_floating_point() and v.numel()))


def st_nonfinite(data, rng, ctx):
    def change(t):
        k = _float_key(t, rng)
        flat = t[k].reshape(-1)
        flat[rng.randrange(flat.numel())] = rng.choice([float("nan"), float("inf"), float("-inf")])
    return _rewrite(data, change, rng)


def st_cast(data, rng, ctx):
    def change(t):
        k = rng.choice(sorted(t))
        t[k] = t[k].to(rng.choice([torch.float16, torch.bfloat16, torch.float64, torch.int64, torch.int32,
                                   torch.uint8, torch.bool, torch.int8, torch.float8_e4m3fn]))
    return _rewrite(data, change, rng)


def st_reshape(data, rng, ctx):
    def change(t):
        k = rng.choice(sorted(k for k, v in t.items() if v.numel() > 1))
        v = t[k]
        t[k] = rng.choice([v.reshape(-1), v.reshape(1, *v.shape), v.reshape(-1)[:-1].clone(),
                           torch.cat([v.reshape(-1), v.reshape(-1)[:1]]), v.transpose(0, -1).contiguous()])
    return _rewrite(data, change, rng)


def st_tensor_set(data, rng, ctx):
    def change(t):
        k = rng.choice(sorted(t))
        how = rng.choice(["drop", "extra", "rename"])
        if how == "drop":
            del t[k]
        elif how == "extra":
            t[k + ".extra"] = torch.zeros(3)
        else:
            t[k.replace(".", "_", 1)] = t.pop(k)
    return _rewrite(data, change, rng)


def st_int_values(data, rng, ctx):
    """Integer tensors (index buffers, counters) set to out-of-range, negative or duplicated values."""
    def change(t):
        ints = sorted(k for k, v in t.items() if not v.is_floating_point() and v.numel())
        if not ints:
            return
        k = rng.choice(ints)
        flat = t[k].reshape(-1)
        flat[rng.randrange(flat.numel())] = rng.choice([-1, -2**40, 2**40, 10**6, int(flat[0]), 2**63 - 1])
    return _rewrite(data, change, rng)


def st_scale(data, rng, ctx):
    """A valid, self-consistent file whose weights are just different (a hostile writer's model)."""
    def change(t):
        k = _float_key(t, rng)
        t[k] = t[k] * rng.choice([-1.0, 0.0, 2.0, 1e30])
    return _rewrite(data, change, rng, keep_digest=True)


SAFETENSORS = {f.__name__: f for f in (st_header_length, st_dtype, st_shape, st_offsets, st_entries, st_metadata,
                                       st_header_junk, st_nonfinite, st_cast, st_reshape, st_tensor_set,
                                       st_int_values, st_scale)}
# a loader that accepts these must load exactly the file's (converted) tensors
VALID_CONTENT = {"st_nonfinite", "st_cast", "st_reshape", "st_tensor_set", "st_int_values", "st_scale"}


# ---- train_state.safetensors metadata ---------------------------------------------------------

def ts_metadata(data, rng, ctx):
    """Change one metadata value of a training state, the digest recomputed (a consistent hostile file)."""
    from simprune.io.files import tensors_bytes

    tensors, meta = _tensors_and_meta(data)
    meta.pop("simprune.sha256", None)
    key = rng.choice(sorted(meta))
    meta[key] = rng.choice(["", "0", "-1", "1e9", "abc", "[]", "{}", "null", "2.5", " 3", "9" * 40, "[{}]",
                            '[{"epoch": "x"}]', "[1, 2]", '{"epoch": 1}', "[" * 10000, "1"])
    return tensors_bytes(tensors, meta)


# ---- JSON mutations (model.json) -------------------------------------------------------------

def _paths(obj, prefix=()):
    yield prefix
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _paths(v, prefix + (k,))
    elif isinstance(obj, list):
        for i, v in enumerate(obj[:8]):
            yield from _paths(v, prefix + (i,))


def _set(obj, path, value):
    if not path:
        return value
    parent = obj
    for p in path[:-1]:
        parent = parent[p]
    parent[path[-1]] = value
    return obj


JSON_VALUES = JUNK + ["resnet20", "resnet20_b", "resnet110", "vgg16", "mobilenetv2", "torchvision:resnet18",
                      "torchvision:vit_h_14", "torchvision:nope", "../../etc/passwd", "resnet20\u0000",
                      float("nan"), float("inf"), 10**400, [3, 100000, 100000], [1, 32], [0, 32, 32], [1, 32, 32],
                      [3, 2**31, 2**31], {"groups": []}, {"groups": {"conv1": {"size": 2**40, "keep": [0]}}},
                      list(range(5000))]


def json_value(data, rng, ctx):
    obj = json.loads(data)
    path = rng.choice([p for p in _paths(obj) if p])
    return json.dumps(_set(obj, path, rng.choice(JSON_VALUES))).encode()


def json_key(data, rng, ctx):
    obj = json.loads(data)
    dicts = [p for p in _paths(obj) if isinstance(_get(obj, p), dict) and _get(obj, p)]
    target = _get(obj, rng.choice(dicts))
    if rng.random() < 0.5:
        del target[rng.choice(sorted(target))]
    else:
        target[rng.choice(["extra", "weights", "__class__", "", "model_args"])] = rng.choice(JSON_VALUES)
    return json.dumps(obj).encode()


def _get(obj, path):
    for p in path:
        obj = obj[p]
    return obj


def json_structure(data, rng, ctx):
    obj = json.loads(data)
    groups = (obj.get("structure") or {}).get("groups") or {}
    if not groups:
        return json_value(data, rng, ctx)
    root = rng.choice(sorted(groups))
    e = groups[root]
    keep = list(e["keep"])
    how = rng.choice(["shuffle", "dup", "range", "negative", "empty", "size", "root", "swap-kept"])
    if how == "shuffle":
        rng.shuffle(keep)
        e["keep"] = keep
    elif how == "dup":
        e["keep"] = keep + keep[:1]
    elif how == "range":
        e["keep"] = keep[:-1] + [e["size"] + rng.randint(0, 2**40)]
    elif how == "negative":
        e["keep"] = [-1] + keep[1:]
    elif how == "empty":
        e["keep"] = []
    elif how == "size":
        e["size"] = rng.choice([0, -1, e["size"] + 1, 2**40, "16"])
    elif how == "root":
        groups[root + ".x"] = groups.pop(root)
    else:  # keep the same count but other channels: the weights decide, the model must still match them
        missing = [c for c in range(e["size"]) if c not in set(keep)]
        if missing:
            keep[rng.randrange(len(keep))] = rng.choice(missing)
            e["keep"] = sorted(keep)
    return json.dumps(obj).encode()


def json_root(data, rng, ctx):
    obj = json.loads(data)
    return json.dumps(rng.choice([[obj], obj.get("model"), None, 5, "model", []])).encode()


def json_deep(data, rng, ctx):
    n = rng.choice([1000, 100_000, 1_000_000])
    return (b'{"format": "simprune-model/1", "model": ' + b"[" * n + b"]" * n + b"}")


def json_huge(data, rng, ctx):
    obj = json.loads(data)
    obj["padding"] = "x" * (17 * 2**20)
    return json.dumps(obj).encode()


def json_encoding(data, rng, ctx):
    return rng.choice([b"\xef\xbb\xbf" + data, data.replace(b'"resnet', b'"r\xe9snet'), data.decode().encode("utf-16"),
                       data.replace(b"resnet", b"res\\ud800net")])


def json_benign(data, rng, ctx):
    """Fields that do not describe the model: loading must give the very same model."""
    obj = json.loads(data)
    key = rng.choice(["command", "data", "notes", "history", "versions"])
    obj[key] = rng.choice(JSON_VALUES)
    return json.dumps(obj, indent=rng.choice([None, 1, 4])).encode()


JSONS = {f.__name__: f for f in (json_benign, json_value, json_key, json_structure, json_root, json_deep, json_huge,
                                  json_encoding)}


# ---- IDX mutations (MNIST / Fashion-MNIST) ----------------------------------------------------

def _idx(dims: tuple[int, ...], body: bytes, dtype: int = 0x08) -> bytes:
    return bytes([0, 0, dtype, len(dims)]) + b"".join(d.to_bytes(4, "big") for d in dims) + body


def idx_header(raw, rng, ctx):
    """Header surgery on the decompressed IDX bytes: type code, rank and declared dimensions."""
    b = bytearray(raw)
    ndim = b[3]
    how = rng.choice(["dtype", "ndim", "dim", "dim", "magic"])
    if how == "dtype":
        b[2] = rng.choice([0x09, 0x0B, 0x0C, 0x0D, 0x0E, 0xFF])
    elif how == "ndim":
        b[3] = rng.choice([0, 2, 4, 5, 255])
    elif how == "magic":
        b[0] = rng.choice([1, 0x1F, 0x80])
    else:
        k = rng.randrange(ndim)
        old = int.from_bytes(b[4 + 4 * k:8 + 4 * k], "big")
        new = rng.choice([0, 1, old - 1, old + 1, 2**32 - 1, 2**31, 65536])
        b[4 + 4 * k:8 + 4 * k] = (new % 2**32).to_bytes(4, "big")
    return bytes(b)


def idx_labels(raw, rng, ctx):
    """A label out of 0..9 (labels files only; images files get a pixel change, which is valid)."""
    b = bytearray(raw)
    start = 4 + 4 * b[3]
    b[rng.randrange(start, len(b))] = rng.choice([10, 11, 99, 255])
    return bytes(b)


def idx_shape(raw, rng, ctx):
    """Valid IDX, wrong shape: images as rank 2 or 4, or a different count than the other file."""
    ndim = raw[3]
    dims = [int.from_bytes(raw[4 + 4 * k:8 + 4 * k], "big") for k in range(ndim)]
    body = raw[4 + 4 * ndim:]
    choice = rng.choice(["flat", "extra", "fewer"])
    if choice == "flat":
        return _idx((dims[0], int(np.prod(dims[1:], dtype=np.int64)) if ndim > 1 else 1), body if ndim > 1 else body)
    if choice == "extra":
        return _idx((*dims, 1), body)
    return _idx((dims[0] - 1, *dims[1:]), body[:len(body) - len(body) // dims[0]])


IDX = {f.__name__: f for f in (idx_header, idx_labels, idx_shape)}


def gz_bomb(data, rng, ctx):
    """A gzip that inflates far beyond what the IDX header declares (the reader must stop early)."""
    head = gzip.decompress(data)[:16]
    return gzip.compress(head + bytes(rng.choice([2**27, 2**28])), compresslevel=1)


def gz_header(data, rng, ctx):
    """Gzip header fields that are not content (mtime, OS byte, stored name): nothing may change."""
    content = gzip.decompress(data)
    buf = io.BytesIO()
    with gzip.GzipFile(filename=rng.choice(["", "x.idx", "\u00e9.bin"]), mode="wb", fileobj=buf,
                       mtime=rng.randrange(2**32)) as f:
        f.write(content)
    b = bytearray(buf.getvalue())
    b[9] = rng.randrange(256)  # OS byte
    return bytes(b)


def gz_concat(data, rng, ctx):
    return data + data[: rng.randint(0, len(data))]


# ---- CIFAR batch mutations (a restricted unpickler reads these) ---------------------------------

def _cifar_entry(n: int, rng) -> dict:
    return {b"batch_label": b"fuzz", b"labels": [rng.randrange(10) for _ in range(n)],
            b"data": np.frombuffer(rng.randbytes(n * 3072), dtype=np.uint8).reshape(n, 3072).copy()}


def cifar_payload(data, rng, ctx):
    entry = _cifar_entry(2, rng)
    where = rng.choice(["root", "data", "labels", "key"])
    p = _Payload(ctx.sentinel)
    if where == "root":
        obj = p
    elif where == "key":
        obj = {**entry, b"extra": [p]}
    else:
        obj = {**entry, where.encode(): p}
    return pickle.dumps(obj, protocol=rng.randint(0, 5))


def cifar_fields(data, rng, ctx):
    """Pickles of plain containers and arrays that pass the unpickler but are no CIFAR batch."""
    entry = _cifar_entry(3, rng)
    n = 3
    how = rng.choice(["data-float", "data-int64", "data-object", "data-bool", "data-shape", "data-1d", "data-list",
                      "labels-str", "labels-float", "labels-neg", "labels-big", "labels-huge", "labels-nested",
                      "labels-len", "labels-none", "labels-array", "missing", "root-list", "int-keys", "bomb"])
    d = entry[b"data"]
    if how == "data-float":
        entry[b"data"] = d.astype(np.float64) * rng.choice([1.0, 1.7, float("nan")])
    elif how == "data-int64":
        entry[b"data"] = d.astype(np.int64) + rng.choice([0, 256, -300])
    elif how == "data-object":
        entry[b"data"] = d.astype(object)
    elif how == "data-bool":
        entry[b"data"] = d.astype(bool)
    elif how == "data-shape":
        entry[b"data"] = d[:, :-1].copy()
    elif how == "data-1d":
        entry[b"data"] = d.reshape(-1)
    elif how == "data-list":
        entry[b"data"] = d.tolist()
    elif how == "labels-str":
        entry[b"labels"] = ["cat"] * n
    elif how == "labels-float":
        entry[b"labels"] = [1.5] * n
    elif how == "labels-neg":
        entry[b"labels"] = [-1] * n
    elif how == "labels-big":
        entry[b"labels"] = [10] * n
    elif how == "labels-huge":
        entry[b"labels"] = [2**70] * n
    elif how == "labels-nested":
        entry[b"labels"] = [[1, 2]] * n
    elif how == "labels-len":
        entry[b"labels"] = entry[b"labels"][:-1]
    elif how == "labels-none":
        entry[b"labels"] = None
    elif how == "labels-array":  # legitimate: labels as an int64 array
        entry[b"labels"] = np.asarray(entry[b"labels"], dtype=np.int64)
    elif how == "missing":
        del entry[rng.choice([b"data", b"labels"])]
    elif how == "root-list":
        entry = [entry]
    elif how == "int-keys":
        entry = {1: d, 2: entry[b"labels"]}
    else:  # "billion laughs": nested shared lists that explode when materialised
        level = [0] * 10
        for _ in range(8):
            level = [level] * 10
        entry[b"labels"] = [level] * n
    return pickle.dumps(entry, protocol=rng.choice([2, 4]))


CIFAR = {f.__name__: f for f in (cifar_payload, cifar_fields)}


# ---- image mutations (imagefolder) ------------------------------------------------------------

def _png(img) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def image_modes(data, rng, ctx):
    """Valid images of other modes and sizes: grayscale, RGBA, palette, 16-bit, CMYK JPEG, 1x1, a strip."""
    from PIL import Image

    arr = np.frombuffer(rng.randbytes(8 * 8 * 4), dtype=np.uint8).reshape(8, 8, 4)
    how = rng.choice(["L", "RGBA", "P", "I;16", "CMYK", "1x1", "strip", "1"])
    if how == "CMYK":
        buf = io.BytesIO()
        Image.fromarray(arr[..., :3]).convert("CMYK").save(buf, format="JPEG")
        return buf.getvalue()
    if how == "I;16":
        return _png(Image.fromarray(arr[..., 0].astype(np.uint16) * 257))
    if how == "1x1":
        return _png(Image.fromarray(arr[:1, :1, :3]))
    if how == "strip":
        return _png(Image.fromarray(np.zeros((1, 3000, 3), dtype=np.uint8)))
    return _png(Image.fromarray(arr).convert(how))


def image_bomb(data, rng, ctx):
    """A tiny PNG whose header declares a huge canvas (decompression bomb)."""
    import struct
    import zlib

    w, h = rng.choice([(30000, 30000), (100000, 1), (10000, 10000), (2**31 - 1, 2**31 - 1)])
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)

    def chunk(kind, body):
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b"")


IMAGES = {f.__name__: f for f in (image_modes, image_bomb)}
