"""Delta codecs: how a device turns a float32 weight delta into the bytes it uploads.

A codec name is `<base>[:<param>][+<compressor>]`, e.g. "fp32", "fp16", "int8", "int4", "int2",
"topk:0.05", "topk:0.01+zstd". Every payload starts with a small header (magic, codec kind, element
count), so decoding a payload of the wrong codec or the wrong shape is an error, never silent garbage.

  fp32, fp16   raw values (fp16 refuses values beyond its range)
  int8/4/2     per-chunk (256) scale max|x| / L, L = 127 / 7 / 1; stochastic rounding from a
               counter-based RNG seeded by the caller (device, round, tensor): unbiased, |error| < scale
  topk:F       the ceil(F * n) largest |x| as float32 values + LEB128 index gaps

Error feedback: the lossy-on-purpose codecs (int4, int2, top-k) return what they did not send as
a residual; the device keeps it and adds it to the next round's delta. The others fold a residual
passed in (e.g. left over from an earlier round with another codec) into what they send and
return None.
"""

from __future__ import annotations

import hashlib
import math
import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import zstandard
from numba import njit

__all__ = [
    "CODECS",
    "COMPRESSORS",
    "CodecError",
    "CodecSpec",
    "decode",
    "derive_seed",
    "encode",
    "parse_codec",
]

MAGIC = b"FPD1"
_HEADER = struct.Struct("<4sBQ")  # magic, kind, element count
INT8_CHUNK = 256  # elements sharing one int8 scale
_FP16_MAX = 65504.0


class CodecError(ValueError):
    """A codec name is unknown, or a payload is corrupted or does not match the expected shape."""


@dataclass(frozen=True)
class CodecSpec:
    """A parsed codec name."""

    base: str
    param: float | None = None
    compressor: str | None = None

    @property
    def name(self) -> str:
        text = self.base if self.param is None else f"{self.base}:{self.param:g}"
        return text if self.compressor is None else f"{text}+{self.compressor}"


# ---------------------------------------------------------------------------------------------
# numba kernels


@njit(cache=True, nogil=True)
def _uniform01(seed: np.uint64, i: np.int64) -> np.float64:
    """Counter-based uniform in [0, 1): splitmix64 of (seed, i). No global RNG state."""
    z = seed + np.uint64(i + 1) * np.uint64(0x9E3779B97F4A7C15)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    z = z ^ (z >> np.uint64(31))
    return np.float64(z >> np.uint64(11)) * (1.0 / 9007199254740992.0)


@njit("float32(float32[::1], int64, int64, float64)", cache=True, nogil=True)
def _chunk_scale(x, lo, hi, levels):
    """absmax of x[lo:hi] / levels: the step that maps the chunk onto [-levels, levels]."""
    amax = 0.0
    for i in range(lo, hi):
        a = abs(np.float64(x[i]))
        if a > amax:
            amax = a
    return np.float32(amax / levels)


@njit("void(float32[::1], int64, uint64, int8[::1], float32[::1])", cache=True, nogil=True)
def _int8_quantize(x, chunk, seed, q, scales):
    """Per-chunk absmax scale; q = floor(x / scale + u), u ~ U[0, 1): unbiased, |error| < scale."""
    n = x.shape[0]
    nchunks = scales.shape[0]
    for c in range(nchunks):
        lo = c * chunk
        hi = min(lo + chunk, n)
        scale = _chunk_scale(x, lo, hi, 127.0)
        scales[c] = scale
        if scale == 0.0:
            for i in range(lo, hi):
                q[i] = 0
            continue
        inv = 1.0 / np.float64(scale)
        for i in range(lo, hi):
            v = math.floor(np.float64(x[i]) * inv + _uniform01(seed, i))
            if v > 127.0:
                v = 127.0
            elif v < -127.0:
                v = -127.0
            q[i] = np.int8(v)


@njit("void(int8[::1], float32[::1], int64, float32[::1])", cache=True, nogil=True)
def _int8_dequantize(q, scales, chunk, out):
    n = q.shape[0]
    for i in range(n):
        out[i] = np.float32(q[i]) * scales[i // chunk]


@njit("void(float32[::1], int64, int64, int64, uint64, uint8[::1], float32[::1])", cache=True, nogil=True)
def _packed_quantize(x, chunk, bits, levels, seed, packed, scales):
    """Low-bit version of _int8_quantize: q in [-levels, levels] stored as q + levels in `bits` bits,
    8 // bits values per byte, lowest bits first."""
    n = x.shape[0]
    vpb = 8 // bits
    for j in range(packed.shape[0]):
        packed[j] = 0
    for c in range(scales.shape[0]):
        lo = c * chunk
        hi = min(lo + chunk, n)
        scale = _chunk_scale(x, lo, hi, levels)
        scales[c] = scale
        inv = 1.0 / np.float64(scale) if scale != 0.0 else 0.0
        for i in range(lo, hi):
            v = math.floor(np.float64(x[i]) * inv + _uniform01(seed, i)) if scale != 0.0 else 0.0
            if v > levels:
                v = levels
            elif v < -levels:
                v = -levels
            code = np.int64(v) + levels
            packed[i // vpb] |= np.uint8(code << ((i % vpb) * bits))


@njit("int64(uint8[::1], float32[::1], int64, int64, int64, float32[::1])", cache=True, nogil=True)
def _packed_dequantize(packed, scales, chunk, bits, levels, out):
    """Inverse of _packed_quantize; returns -1 on a code above 2 * levels or non-zero padding bits."""
    n = out.shape[0]
    vpb = 8 // bits
    mask = (1 << bits) - 1
    for i in range(packed.shape[0] * vpb):
        code = (np.int64(packed[i // vpb]) >> ((i % vpb) * bits)) & mask
        if i >= n:
            if code != 0:
                return -1
            continue
        if code > 2 * levels:
            return -1
        out[i] = np.float32(code - levels) * scales[i // chunk]
    return 0


@njit("int64(int64[::1], uint8[::1])", cache=True, nogil=True)
def _varint_gaps_encode(idx, out):
    """Sorted indices -> LEB128 varints of their gaps (first gap from 0) in `out`; returns bytes used."""
    pos = 0
    prev = np.int64(0)
    for j in range(idx.shape[0]):
        g = np.uint64(idx[j] - prev)
        prev = idx[j]
        while g >= np.uint64(0x80):
            out[pos] = np.uint8((g & np.uint64(0x7F)) | np.uint64(0x80))
            g >>= np.uint64(7)
            pos += 1
        out[pos] = np.uint8(g)
        pos += 1
    return pos


@njit("int64(uint8[::1], int64, int64[::1])", cache=True, nogil=True)
def _varint_gaps_decode(buf, n, idx):
    """LEB128 gaps -> indices in `idx`. Returns 0, or -1 if the stream is malformed, does not hold
    exactly len(idx) varints, or the indices are not strictly increasing and below n."""
    pos = 0
    size = buf.shape[0]
    cur = np.int64(-1)
    for j in range(idx.shape[0]):
        g = np.uint64(0)
        shift = np.uint64(0)
        while True:
            if pos >= size or shift > np.uint64(56):
                return -1
            b = np.uint64(buf[pos])
            pos += 1
            g |= (b & np.uint64(0x7F)) << shift
            if b < np.uint64(0x80):
                break
            shift += np.uint64(7)
        if g >= np.uint64(n) or (j > 0 and g == np.uint64(0)):
            return -1
        cur = np.int64(g) if j == 0 else cur + np.int64(g)
        if cur >= n:
            return -1
        idx[j] = cur
    if pos != size:
        return -1
    return 0


# ---------------------------------------------------------------------------------------------
# base codecs: encode(flat float32, param, seed) -> body; decode(body, n, param) -> flat float32


def _check_finite(x: np.ndarray, what: str) -> None:
    if not np.isfinite(x).all():
        raise CodecError(f"{what} has non-finite values (NaN or Inf)")


def _enc_fp32(x: np.ndarray, param: float | None, seed: int) -> bytes:
    return x.astype("<f4", copy=False).tobytes()


def _dec_fp32(body: memoryview, n: int, param: float | None) -> np.ndarray:
    if len(body) != 4 * n:
        raise CodecError(f"fp32 payload has {len(body)} bytes, expected {4 * n}")
    return np.frombuffer(body, dtype="<f4").astype(np.float32)


def _enc_fp16(x: np.ndarray, param: float | None, seed: int) -> bytes:
    if x.size and float(np.abs(x).max()) > _FP16_MAX:
        raise CodecError(f"fp16 cannot represent values beyond {_FP16_MAX:g} (max |delta| {np.abs(x).max():g})")
    return x.astype("<f2").tobytes()


def _dec_fp16(body: memoryview, n: int, param: float | None) -> np.ndarray:
    if len(body) != 2 * n:
        raise CodecError(f"fp16 payload has {len(body)} bytes, expected {2 * n}")
    return np.frombuffer(body, dtype="<f2").astype(np.float32)


def _enc_int8(x: np.ndarray, param: float | None, seed: int) -> bytes:
    n = x.size
    nchunks = -(-n // INT8_CHUNK)
    q = np.empty(n, np.int8)
    scales = np.empty(nchunks, np.float32)
    _int8_quantize(x, INT8_CHUNK, np.uint64(seed), q, scales)
    return struct.pack("<I", INT8_CHUNK) + scales.astype("<f4").tobytes() + q.tobytes()


def _dec_int8(body: memoryview, n: int, param: float | None) -> np.ndarray:
    if len(body) < 4:
        raise CodecError("int8 payload is too short for its chunk size")
    (chunk,) = struct.unpack_from("<I", body, 0)
    if chunk <= 0:
        raise CodecError(f"int8 payload has a bad chunk size {chunk}")
    nchunks = -(-n // chunk)
    expected = 4 + 4 * nchunks + n
    if len(body) != expected:
        raise CodecError(f"int8 payload has {len(body)} bytes, expected {expected}")
    scales = np.frombuffer(body, dtype="<f4", count=nchunks, offset=4).astype(np.float32)
    if not np.isfinite(scales).all() or (scales < 0).any():
        raise CodecError("int8 payload has non-finite or negative scales")
    q = np.frombuffer(body, dtype=np.int8, count=n, offset=4 + 4 * nchunks).copy()
    if (q == -128).any():
        raise CodecError("int8 payload has the out-of-range value -128")
    out = np.empty(n, np.float32)
    _int8_dequantize(q, scales, chunk, out)
    return out


LOWBIT_CHUNK = 256


def _lowbit(bits: int) -> tuple[Callable, Callable]:
    """intB codecs (B = 4 or 2): per-chunk scale amax / (2^(B-1) - 1), stochastic rounding, packed."""
    levels = (1 << (bits - 1)) - 1
    vpb = 8 // bits

    def enc(x: np.ndarray, param: float | None, seed: int) -> bytes:
        n = x.size
        scales = np.empty(-(-n // LOWBIT_CHUNK), np.float32)
        packed = np.empty(-(-n // vpb), np.uint8)
        _packed_quantize(x, LOWBIT_CHUNK, bits, levels, np.uint64(seed), packed, scales)
        return struct.pack("<I", LOWBIT_CHUNK) + scales.astype("<f4").tobytes() + packed.tobytes()

    def dec(body: memoryview, n: int, param: float | None) -> np.ndarray:
        name = f"int{bits}"
        if len(body) < 4:
            raise CodecError(f"{name} payload is too short for its chunk size")
        (chunk,) = struct.unpack_from("<I", body, 0)
        if chunk <= 0:
            raise CodecError(f"{name} payload has a bad chunk size {chunk}")
        nchunks = -(-n // chunk)
        nbytes = -(-n // vpb)
        expected = 4 + 4 * nchunks + nbytes
        if len(body) != expected:
            raise CodecError(f"{name} payload has {len(body)} bytes, expected {expected}")
        scales = np.frombuffer(body, dtype="<f4", count=nchunks, offset=4).astype(np.float32)
        if not np.isfinite(scales).all() or (scales < 0).any():
            raise CodecError(f"{name} payload has non-finite or negative scales")
        packed = np.frombuffer(body, dtype=np.uint8, count=nbytes, offset=4 + 4 * nchunks).copy()
        out = np.empty(n, np.float32)
        if _packed_dequantize(packed, scales, chunk, bits, levels, out) != 0:
            raise CodecError(f"{name} payload has out-of-range codes or non-zero padding")
        return out

    return enc, dec


_enc_int4, _dec_int4 = _lowbit(4)
_enc_int2, _dec_int2 = _lowbit(2)


_TOPK_HEADER = struct.Struct("<Q")  # k; then k float32 values, then k LEB128 index gaps


def topk_count(n: int, fraction: float) -> int:
    """How many entries top-k keeps of n: ceil(fraction * n), at least 1 when n > 0."""
    return 0 if n == 0 else min(n, max(1, math.ceil(fraction * n)))


def _enc_topk(x: np.ndarray, param: float | None, seed: int) -> bytes:
    assert param is not None
    n = x.size
    k = topk_count(n, param)
    if k == n:
        idx = np.arange(n, dtype=np.int64)
    else:
        idx = np.argpartition(np.abs(x), n - k)[n - k :].astype(np.int64)
        idx.sort()
    gaps = np.empty(10 * k, np.uint8)
    used = _varint_gaps_encode(idx, gaps)
    return _TOPK_HEADER.pack(k) + x[idx].astype("<f4").tobytes() + gaps[:used].tobytes()


def _dec_topk(body: memoryview, n: int, param: float | None) -> np.ndarray:
    if len(body) < _TOPK_HEADER.size:
        raise CodecError("topk payload is too short for its header")
    (k,) = _TOPK_HEADER.unpack_from(body, 0)
    if k > n:
        raise CodecError(f"topk payload claims {k} entries for {n} elements")
    off = _TOPK_HEADER.size
    if len(body) < off + 4 * k + k:
        raise CodecError(f"topk payload has {len(body)} bytes, too few for {k} entries")
    vals = np.frombuffer(body, dtype="<f4", count=k, offset=off).astype(np.float32)
    gaps = np.frombuffer(body, dtype=np.uint8, offset=off + 4 * k).copy()
    idx = np.empty(k, np.int64)
    if _varint_gaps_decode(gaps, n, idx) != 0:
        raise CodecError("topk payload has malformed indices: truncated, trailing bytes, out of range "
                         "or not strictly increasing")
    out = np.zeros(n, np.float32)
    out[idx] = vals
    return out


@dataclass(frozen=True)
class _Base:
    kind: int
    encode: Callable[[np.ndarray, float | None, int], bytes]
    decode: Callable[[memoryview, int, float | None], np.ndarray]
    error_feedback: bool  # returns a residual to carry into the next round
    needs_param: bool = False


CODECS: dict[str, _Base] = {
    "fp32": _Base(1, _enc_fp32, _dec_fp32, error_feedback=False),
    "fp16": _Base(2, _enc_fp16, _dec_fp16, error_feedback=False),
    "int8": _Base(3, _enc_int8, _dec_int8, error_feedback=False),
    "topk": _Base(4, _enc_topk, _dec_topk, error_feedback=True, needs_param=True),
    "int4": _Base(5, _enc_int4, _dec_int4, error_feedback=True),
    "int2": _Base(6, _enc_int2, _dec_int2, error_feedback=True),
}


# ---------------------------------------------------------------------------------------------
# compressors on top of a payload


def _zstd_compress(data: bytes) -> bytes:
    return zstandard.ZstdCompressor(level=9, write_content_size=True).compress(data)


def _zstd_decompress(data: bytes, limit: int) -> bytes:
    try:
        size = zstandard.frame_content_size(data)
        if size > limit:
            raise CodecError(f"zstd frame claims {size} bytes, more than the {limit} a payload can have")
        return zstandard.ZstdDecompressor().decompress(data, max_output_size=limit, allow_extra_data=False)
    except zstandard.ZstdError as exc:
        raise CodecError(f"zstd payload is corrupted: {exc}") from exc


def _zlib_compress(data: bytes) -> bytes:
    return zlib.compress(data, 9)


def _zlib_decompress(data: bytes, limit: int) -> bytes:
    try:
        d = zlib.decompressobj()
        out = d.decompress(data, limit + 1)
        if len(out) > limit or d.unconsumed_tail or d.unused_data or not d.eof:
            raise CodecError("zlib payload is truncated, has trailing bytes or is too large for this shape")
        return out
    except zlib.error as exc:
        raise CodecError(f"zlib payload is corrupted: {exc}") from exc


COMPRESSORS: dict[str, tuple[Callable[[bytes], bytes], Callable[[bytes, int], bytes]]] = {
    "zstd": (_zstd_compress, _zstd_decompress),
    "zlib": (_zlib_compress, _zlib_decompress),
}


# ---------------------------------------------------------------------------------------------
# public API


# Batch-norm running statistics always travel lossless (fp32, a few floats per layer): a quantized
# running variance can come out negative, and the server refuses updates that make one negative.
STATISTICS_SUFFIXES = (".running_mean", ".running_var")


def codec_for(tensor: str, spec: CodecSpec) -> CodecSpec:
    """The codec a tensor is sent with: `spec`, except fp32 for batch-norm running statistics."""
    return CodecSpec("fp32") if tensor.endswith(STATISTICS_SUFFIXES) else spec


def parse_codec(name: str) -> CodecSpec:
    """'topk:0.05+zstd' -> CodecSpec('topk', 0.05, 'zstd'); CodecError names what is wrong."""
    text = name.strip().lower()
    base, _, compressor = text.partition("+")
    base, colon, param_text = base.partition(":")
    if base not in CODECS:
        raise CodecError(f"unknown codec {name!r}; known: {sorted(CODECS)} with optional +{'/+'.join(COMPRESSORS)}")
    if compressor and compressor not in COMPRESSORS:
        raise CodecError(f"unknown compressor {compressor!r} in {name!r}; known: {sorted(COMPRESSORS)}")
    param: float | None = None
    if CODECS[base].needs_param:
        try:
            param = float(param_text)
        except ValueError:
            raise CodecError(f"codec {name!r} needs a fraction, e.g. {base}:0.05") from None
        if not 0.0 < param <= 1.0:
            raise CodecError(f"codec {name!r}: the fraction must be in (0, 1], got {param_text}")
    elif colon:
        raise CodecError(f"codec {base!r} takes no parameter, got {name!r}")
    return CodecSpec(base, param, compressor or None)


def derive_seed(*parts: object) -> int:
    """A 64-bit RNG seed from e.g. (device id, round id, tensor name): stable across runs and hosts."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little")


def _max_payload(n: int) -> int:
    """An upper bound on any uncompressed payload for n elements (bounds decompression)."""
    return _HEADER.size + 64 + 12 * n


def encode(
    codec: str | CodecSpec, delta: np.ndarray, residual: np.ndarray | None = None, rng_seed: int = 0
) -> tuple[bytes, np.ndarray | None]:
    """Encode one tensor's delta (+ carried residual). Returns (payload, residual to carry or None)."""
    spec = codec if isinstance(codec, CodecSpec) else parse_codec(codec)
    base = CODECS[spec.base]
    x = np.ascontiguousarray(delta, dtype=np.float32).reshape(-1)
    _check_finite(x, "delta")
    if residual is not None:
        if residual.size != x.size:
            raise CodecError(f"residual has {residual.size} elements, the delta {x.size}")
        x = x + np.ascontiguousarray(residual, dtype=np.float32).reshape(-1)
        _check_finite(x, "delta + residual")
    body = base.encode(x, spec.param, int(rng_seed) & 0xFFFFFFFFFFFFFFFF)
    payload = _HEADER.pack(MAGIC, base.kind, x.size) + body
    new_residual = None
    if base.error_feedback:
        sent = base.decode(memoryview(body), x.size, spec.param)
        new_residual = (x - sent).reshape(np.shape(delta))
    if spec.compressor is not None:
        payload = COMPRESSORS[spec.compressor][0](payload)
    return payload, new_residual


def decode(codec: str | CodecSpec, payload: bytes, shape: tuple[int, ...] | list[int]) -> np.ndarray:
    """Decode a payload into a float32 array of `shape`; CodecError if it is corrupted or mismatched."""
    spec = codec if isinstance(codec, CodecSpec) else parse_codec(codec)
    base = CODECS[spec.base]
    shape = tuple(int(s) for s in shape)
    if any(s < 0 for s in shape):
        raise CodecError(f"bad shape {shape}")
    n = math.prod(shape)
    data = bytes(payload) if not isinstance(payload, bytes) else payload
    if spec.compressor is not None:
        data = COMPRESSORS[spec.compressor][1](data, _max_payload(n))
    if len(data) < _HEADER.size:
        raise CodecError(f"payload has {len(data)} bytes, shorter than the {_HEADER.size}-byte header")
    magic, kind, count = _HEADER.unpack_from(data, 0)
    if magic != MAGIC:
        raise CodecError("payload does not start with the codec magic (corrupted or not a codec payload)")
    if kind != base.kind:
        names = {b.kind: name for name, b in CODECS.items()}
        raise CodecError(f"payload was encoded with {names.get(kind, f'kind {kind}')!r}, expected {spec.base!r}")
    if count != n:
        raise CodecError(f"payload holds {count} elements, shape {shape} needs {n}")
    out = base.decode(memoryview(data)[_HEADER.size :], n, spec.param)
    _check_finite(out, "decoded payload")
    return out.reshape(shape)
