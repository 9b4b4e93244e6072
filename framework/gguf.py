"""GGUF files (llama.cpp's single-file model format) read as data: metadata and tensors,
quantized blocks dequantized to float32 by limner's own code.

The layout is ggml's `docs/gguf.md`: magic "GGUF", version 2 or 3, tensor and key-value counts,
typed key-values (arrays of strings carry a tokenizer's vocabulary and merges), tensor infos
(name, dims fastest-first, ggml type, offset), then the data aligned to `general.alignment`.
A stranger's file never runs code: every length and offset is checked against the file before
it is read, and a bad one is named with the file. Block formats (ggml-quants.c, one 32-value
block each): Q8_0 = f16 scale + 32 int8; Q4_0 = f16 scale + 16 bytes of 4-bit values, offset 8;
Q4_1 = f16 scale + f16 minimum + 16 bytes; Q5_0/Q5_1 add 32 high bits. The low nibbles of a
block are its first 16 values, the high nibbles its last 16. The k-quants (ggml-common.h's
block_q*_K; llama.cpp PR #1684) hold 256 values in sub-blocks of 16 or 32, each with its own
scale (and minimum) quantized against the block's f16 scale (and f16 minimum): Q2_K 16 x 4-bit
scale/minimum + 2-bit values; Q3_K 16 6-bit scales + 2 bits + a high-bit mask, offset 4; Q4_K
and Q5_K 8 6-bit scales and minima packed in 12 bytes + 4 bits (Q5_K a fifth bit); Q6_K 16
int8 scales + 4 low and 2 high bits, offset 32 - the types of the common Q2_K..Q6_K "_M" files.
"""
from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import LimnerError

MAGIC = b"GGUF"

# value types of the key-value section: struct format (or None: string/array)
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9

# ggml tensor types: name, values per block, bytes per block (those limner dequantizes)
TYPES = {0: ("F32", 1, 4), 1: ("F16", 1, 2), 30: ("BF16", 1, 2), 2: ("Q4_0", 32, 18), 3: ("Q4_1", 32, 20),
         6: ("Q5_0", 32, 22), 7: ("Q5_1", 32, 24), 8: ("Q8_0", 32, 34), 10: ("Q2_K", 256, 84),
         11: ("Q3_K", 256, 110), 12: ("Q4_K", 256, 144), 13: ("Q5_K", 256, 176), 14: ("Q6_K", 256, 210)}
# the rest of ggml's types, named when a file uses one
OTHER_TYPES = {9: "Q8_1", 15: "Q8_K", 16: "IQ2_XXS",
               17: "IQ2_XS", 18: "IQ3_XXS", 19: "IQ1_S", 20: "IQ4_NL", 21: "IQ3_S", 22: "IQ2_S", 23: "IQ4_XS",
               24: "I8", 25: "I16", 26: "I32", 27: "I64", 28: "F64", 29: "IQ1_M", 34: "TQ1_0", 35: "TQ2_0",
               39: "MXFP4"}


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]  # torch order (slowest first): ggml's dims reversed
    type: int
    offset: int  # from the start of the file

    @property
    def type_name(self) -> str:
        return TYPES[self.type][0] if self.type in TYPES else OTHER_TYPES.get(self.type, f"type {self.type}")

    @property
    def nbytes(self) -> int:
        _, block, size = TYPES[self.type]
        return _numel(self.shape) // block * size


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


class GGUFFile:
    """A GGUF file's metadata (dict of key -> value) and tensors (name -> TensorInfo), memory-mapped."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        try:
            with open(self.path, "rb") as f:
                self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
        except (OSError, ValueError) as e:  # ValueError: an empty file cannot be mapped
            raise LimnerError(f"cannot read the GGUF file {self.path}: {e}") from None
        self._pos = 0
        if self._take(4) != MAGIC:
            raise self._bad("it does not start with the GGUF magic (not a GGUF file)")
        version = self._scalar(4)
        if version not in (2, 3):
            raise self._bad(f"GGUF version {version}; versions 2 and 3 are read")
        n_tensors, n_kv = self._scalar(10), self._scalar(10)
        size = len(self._map)
        if n_tensors > size // 8 or n_kv > size // 8:  # each entry takes at least 8 bytes
            raise self._bad(f"it claims {n_tensors} tensors and {n_kv} keys, more than its {size} bytes can hold")
        self.metadata: dict[str, object] = {}
        for _ in range(n_kv):
            key = self._string()
            self.metadata[key] = self._value(self._scalar(4))
        infos = []
        for _ in range(n_tensors):
            name = self._string()
            n_dims = self._scalar(4)
            if n_dims > 8:
                raise self._bad(f"tensor {name!r} has {n_dims} dimensions (ggml allows at most 4)")
            dims = tuple(self._scalar(10) for _ in range(n_dims))
            infos.append((name, dims[::-1], self._scalar(4), self._scalar(10)))
        alignment = self.metadata.get("general.alignment", 32)
        if not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1):
            raise self._bad(f"general.alignment is {alignment!r}, not a power of two")
        start = -(-self._pos // alignment) * alignment
        self.tensors: dict[str, TensorInfo] = {}
        for name, shape, kind, offset in infos:
            info = TensorInfo(name, shape, kind, start + offset)
            if kind in TYPES:
                block = TYPES[kind][1]
                if shape and shape[-1] % block:
                    raise self._bad(f"tensor {name!r} ({info.type_name}) has rows of {shape[-1]} values, not a "
                                    f"multiple of its {block}-value blocks")
                if info.offset + info.nbytes > size:
                    raise self._bad(f"tensor {name!r} runs past the end of the file (truncated?)")
            if name in self.tensors:
                raise self._bad(f"tensor {name!r} appears twice")
            self.tensors[name] = info

    def _bad(self, why: str) -> LimnerError:
        return LimnerError(f"{self.path} is not a GGUF file limner can read: {why}")

    def _take(self, n: int) -> bytes:
        if n < 0 or self._pos + n > len(self._map):
            raise self._bad(f"it ends inside its header (at byte {self._pos}, {n} more wanted): truncated?")
        out = self._map[self._pos: self._pos + n]
        self._pos += n
        return out

    def _scalar(self, kind: int):
        fmt = _SCALARS[kind]
        return struct.unpack(fmt, self._take(struct.calcsize(fmt)))[0]

    def _string(self) -> str:
        raw = self._take(self._scalar(10))
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            return raw.decode("utf-8", errors="replace")  # a vocabulary may hold partial byte sequences

    def _value(self, kind: int, depth: int = 0):
        if kind in _SCALARS:
            return self._scalar(kind)
        if kind == _STRING:
            return self._string()
        if kind == _ARRAY:
            if depth > 4:
                raise self._bad("its metadata nests arrays more than 4 deep")
            inner, count = self._scalar(4), self._scalar(10)
            if count > len(self._map) - self._pos:  # every element takes at least one byte
                raise self._bad(f"an array claims {count} elements, more than the file holds")
            if inner in _SCALARS:  # one unpack for the whole array (token types, scores)
                fmt = _SCALARS[inner]
                return list(struct.unpack(f"<{count}{fmt[1]}", self._take(count * struct.calcsize(fmt))))
            return [self._value(inner, depth + 1) for _ in range(count)]
        raise self._bad(f"a key has value type {kind}, which GGUF does not define")

    def tensor(self, name: str) -> torch.Tensor:
        """The tensor `name` as float32, dequantized, in torch's order ([out, in] for a weight)."""
        if name not in self.tensors:
            raise LimnerError(f"{self.path} has no tensor {name!r}")
        info = self.tensors[name]
        if info.type not in TYPES:
            supported = ", ".join(t[0] for t in TYPES.values())
            raise LimnerError(f"{self.path}: tensor {name!r} is stored as {info.type_name}, which limner does not "
                              f"dequantize (it reads {supported}); convert the file to one of those with "
                              "llama.cpp's llama-quantize")
        raw = torch.frombuffer(self._map, dtype=torch.uint8, count=info.nbytes, offset=info.offset)
        return dequantize(raw, TYPES[info.type][0], info.shape)

    def close(self) -> None:
        self._map.close()


def is_gguf(path: str | Path) -> bool:
    """Whether `path` is a file that starts with the GGUF magic."""
    try:
        with open(path, "rb") as f:
            return f.read(4) == MAGIC
    except OSError:
        return False


def describe(path: str | Path) -> dict:
    """What a GGUF file holds (`limner inspect`): its model's architecture and shape as its
    <arch>.* keys say, its tokenizer, its tensors' types and parameter count, and which types
    limner cannot dequantize (the architectures limner runs: the text encoders that read GGUF
    files, `limner plugins`)."""
    file = GGUFFile(path)
    try:
        meta, tensors = file.metadata, file.tensors
    finally:
        file.close()
    arch = meta.get("general.architecture")
    keys = {"context_length": "context", "block_count": "layers", "embedding_length": "width",
            "feed_forward_length": "feed-forward width", "attention.head_count": "heads",
            "attention.head_count_kv": "key-value heads", "attention.key_length": "head dim",
            "rope.freq_base": "rotary base"}
    model = {said: meta[f"{arch}.{key}"] for key, said in keys.items() if f"{arch}.{key}" in meta}
    types: dict[str, int] = {}
    for info in tensors.values():
        types[info.type_name] = types.get(info.type_name, 0) + 1
    vocabulary = meta.get("tokenizer.ggml.tokens")
    unread = sorted({info.type_name for info in tensors.values() if info.type not in TYPES})
    return {"path": str(path), "format": "GGUF (llama.cpp)", "name": meta.get("general.name"), "architecture": arch,
            "model": model,
            "tokenizer": {"kind": meta.get("tokenizer.ggml.model"), "pre-tokenizer": meta.get("tokenizer.ggml.pre"),
                          "tokens": len(vocabulary) if isinstance(vocabulary, list) else None},
            "parameters": sum(_numel(info.shape) for info in tensors.values()),
            "tensor types": dict(sorted(types.items(), key=lambda kv: -kv[1])),
            "types limner cannot dequantize": ", ".join(unread) or "none"}


def _f16(blocks: torch.Tensor, start: int) -> torch.Tensor:
    """The little-endian float16 at byte `start` of every block, as float32 [n, 1]."""
    return blocks[:, start: start + 2].contiguous().view(torch.float16).float()


def _nibbles(qs: torch.Tensor) -> torch.Tensor:
    """16 bytes per block -> 32 values: low nibbles first, then high nibbles."""
    return torch.cat([qs & 0x0F, qs >> 4], dim=1)


def _high_bits(blocks: torch.Tensor, start: int) -> torch.Tensor:
    """Q5's 32 fifth bits (a little-endian uint32 at `start`), bit j for value j, as 0/16."""
    bits = blocks[:, start: start + 4].long()
    word = bits[:, 0] | bits[:, 1] << 8 | bits[:, 2] << 16 | bits[:, 3] << 24
    return ((word[:, None] >> torch.arange(32)) & 1) << 4


def _k_scales(packed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_K/Q5_K's 12 bytes -> 8 six-bit scales and 8 six-bit minima: bytes 0-3 and 4-7 hold the
    first four of each in their low 6 bits and the last four's top 2 bits; bytes 8-11 the last
    four's low 4 bits (scales in the low nibble, minima in the high)."""
    s = packed.long()
    scales = torch.cat([s[:, 0:4] & 63, (s[:, 8:12] & 15) | (s[:, 0:4] >> 6) << 4], dim=1)
    minima = torch.cat([s[:, 4:8] & 63, (s[:, 8:12] >> 4) | (s[:, 4:8] >> 6) << 4], dim=1)
    return scales.float(), minima.float()


def _k_nibbles(qs: torch.Tensor) -> torch.Tensor:
    """128 bytes -> 8 sub-blocks of 32 values: each 32 bytes give a sub-block of low nibbles, then
    one of high nibbles."""
    q = qs.long().reshape(-1, 4, 1, 32)
    return torch.cat([q & 15, q >> 4], dim=2).reshape(-1, 8, 32)


def _crumbs(q: torch.Tensor, shifts: list[int], bits: int = 2) -> torch.Tensor:
    """q [n, L] -> [n, len(shifts), L]: the `bits`-bit field at each shift of every byte."""
    return (q.long()[:, None, :] >> torch.tensor(shifts)[None, :, None]) & ((1 << bits) - 1)


def _dequantize_k(blocks: torch.Tensor, kind: str) -> torch.Tensor:
    """One 256-value k-quant block per row -> [n, 256] float32."""
    n = len(blocks)
    if kind == "Q2_K":  # scales[16] (scale | minimum << 4), qs[64], d, dmin
        sm = blocks[:, 0:16].long()
        halves = [_crumbs(blocks[:, 16 + 32 * h: 48 + 32 * h], [0, 2, 4, 6]).reshape(n, 8, 16) for h in (0, 1)]
        q = torch.cat(halves, dim=1).float()
        return (_f16(blocks, 80)[:, :, None] * (sm & 15).float()[:, :, None] * q
                - _f16(blocks, 82)[:, :, None] * (sm >> 4).float()[:, :, None]).reshape(n, 256)
    if kind == "Q3_K":  # hmask[32], qs[64], scales[12], d
        s = blocks[:, 96:108].long()
        scales = torch.cat([(s[:, 0:4] & 15) | (s[:, 8:12] & 3) << 4, (s[:, 4:8] & 15) | (s[:, 8:12] >> 2 & 3) << 4,
                            (s[:, 0:4] >> 4) | (s[:, 8:12] >> 4 & 3) << 4, (s[:, 4:8] >> 4) | (s[:, 8:12] >> 6) << 4],
                           dim=1) - 32
        halves = []
        for h in (0, 1):
            low = _crumbs(blocks[:, 32 + 32 * h: 64 + 32 * h], [0, 2, 4, 6])
            high = _crumbs(blocks[:, 0:32], [4 * h, 4 * h + 1, 4 * h + 2, 4 * h + 3], bits=1)
            halves.append((low - 4 * (1 - high)).reshape(n, 8, 16))
        q = torch.cat(halves, dim=1).float()
        return (_f16(blocks, 108)[:, :, None] * scales.float()[:, :, None] * q).reshape(n, 256)
    if kind in ("Q4_K", "Q5_K"):  # d, dmin, scales[12], (Q5_K: qh[32]), qs[128]
        scales, minima = _k_scales(blocks[:, 4:16])
        if kind == "Q4_K":
            q = _k_nibbles(blocks[:, 16:144])
        else:
            q = _k_nibbles(blocks[:, 48:176]) | _crumbs(blocks[:, 16:48], list(range(8)), bits=1) << 4
        return (_f16(blocks, 0)[:, :, None] * scales[:, :, None] * q.float()
                - _f16(blocks, 2)[:, :, None] * minima[:, :, None]).reshape(n, 256)
    # Q6_K: ql[128], qh[64], scales[16] (int8), d; each half of 128 values reads 64 ql and 32 qh bytes
    halves = []
    for h in (0, 1):
        ql = blocks[:, 64 * h: 64 * h + 64].long().reshape(n, 2, 32)
        low = torch.cat([ql & 15, ql >> 4], dim=1)  # the 32-value rows of y[0:32], y[32:64], y[64:96], y[96:128]
        halves.append((low | _crumbs(blocks[:, 128 + 32 * h: 160 + 32 * h], [0, 2, 4, 6]) << 4).reshape(n, 128))
    q = torch.cat(halves, dim=1).float() - 32
    scales = blocks[:, 192:208].contiguous().view(torch.int8).float().repeat_interleave(16, dim=1)
    return _f16(blocks, 208) * scales * q


def dequantize(raw: torch.Tensor, kind: str, shape: tuple[int, ...]) -> torch.Tensor:
    """Bytes (uint8) of a ggml tensor of type `kind` -> float32 of `shape`. Quantized blocks are
    decoded CHUNK values at a time into the output, so a large embedding's integer intermediates
    (8 bytes a value) never exist all at once."""
    if kind == "F32":
        return raw.view(torch.float32).reshape(shape).clone()
    if kind in ("F16", "BF16"):
        return raw.view(torch.float16 if kind == "F16" else torch.bfloat16).float().reshape(shape)
    _, per_block, size = TYPES[next(k for k, v in TYPES.items() if v[0] == kind)]
    blocks = raw.reshape(-1, size)
    out = torch.empty(len(blocks), per_block)
    step = max(1, CHUNK // per_block)
    for start in range(0, len(blocks), step):
        out[start: start + step] = _decode(blocks[start: start + step], kind)
    return out.reshape(shape)


CHUNK = 1 << 22  # values decoded at once by dequantize


def _decode(blocks: torch.Tensor, kind: str) -> torch.Tensor:
    """[n, bytes per block] of one quantized type -> [n, values per block] float32."""
    if kind == "Q8_0":
        return _f16(blocks, 0) * blocks[:, 2:].contiguous().view(torch.int8).float()
    if kind == "Q4_0":
        return _f16(blocks, 0) * (_nibbles(blocks[:, 2:]).float() - 8)
    if kind == "Q4_1":
        return _f16(blocks, 0) * _nibbles(blocks[:, 4:]).float() + _f16(blocks, 2)
    if kind == "Q5_0":
        return _f16(blocks, 0) * ((_nibbles(blocks[:, 6:]).long() | _high_bits(blocks, 2)).float() - 16)
    if kind == "Q5_1":
        return _f16(blocks, 0) * (_nibbles(blocks[:, 8:]).long() | _high_bits(blocks, 4)).float() + _f16(blocks, 2)
    if kind.endswith("_K"):
        return _dequantize_k(blocks, kind)
    raise LimnerError(f"no dequantization for {kind}")
