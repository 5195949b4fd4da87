"""Delta codecs: how a device turns a float32 weight delta into the bytes it uploads.

A codec name is `<base>[:<param>][+<compressor>]`, e.g. "fp32", "fp16", "int8", "int4", "int2",
"topk:0.05", "topk:0.01+zstd". Every payload starts with a small header (magic, codec kind, element
count), so decoding a payload of the wrong codec or the wrong shape is an error, never silent garbage.

  fp32, fp16   raw values (fp16 refuses values beyond its range)
  int8/4/2     per-chunk scale max|x| / L over QUANT_CHUNK = 256 values, L = 127 / 7 / 1 (the entry's
               .chunk and .levels); stochastic rounding from fedpers.rng's counter-based stream
               seeded by the caller (device, round, tensor): unbiased, |error| < scale
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
from types import ModuleType
from typing import NamedTuple

import numpy as np
import zstandard

__all__ = [
    "CODECS",
    "COMPRESSORS",
    "CodecError",
    "CodecSpec",
    "Compressor",
    "codec_choices",
    "codec_help",
    "decode",
    "derive_seed",
    "encode",
    "parse_codec",
]

MAGIC = b"FPD1"
_HEADER = struct.Struct("<4sBQ")  # magic, kind, element count
QUANT_CHUNK = 256  # elements sharing one scale in int8 / int4 / int2 payloads (each payload records it)
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
# base codecs: encode(flat float32, param, seed) -> body; decode(body, n, param) -> flat float32


def _kernels() -> ModuleType:
    """The vectorized numpy kernels (fedpers.codec_kernels), imported on the first encode or decode,
    so that codec names and help import light."""
    from . import codec_kernels

    return codec_kernels


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


@dataclass(frozen=True)
class _Base:
    """One base codec: its payload kind byte, encoder and decoder, and what a caller may rely on."""

    kind: int
    encode: Callable[[np.ndarray, float | None, int], bytes]
    decode: Callable[[memoryview, int, float | None], np.ndarray]
    error_feedback: bool  # returns a residual to carry into the next round
    help: str  # one line for CLIs (codec_choices)
    needs_param: bool = False  # named '<base>:F' with a fraction F
    chunk: int | None = None  # quantizers: elements sharing one scale
    levels: int | None = None  # quantizers: codes span [-levels, levels]; scale = chunk absmax / levels


def _levels(bits: int) -> int:
    """Codes of a `bits`-bit quantizer span [-levels, levels]: 127, 7, 1 for 8, 4, 2 bits."""
    return (1 << (bits - 1)) - 1


def _check_chunked(name: str, body: memoryview, n: int, data_bytes: Callable[[int], int]) -> tuple[int, np.ndarray]:
    """The chunk size and float32 scales of a quantized payload, after checking its length."""
    if len(body) < 4:
        raise CodecError(f"{name} payload is too short for its chunk size")
    (chunk,) = struct.unpack_from("<I", body, 0)
    if chunk <= 0:
        raise CodecError(f"{name} payload has a bad chunk size {chunk}")
    nchunks = -(-n // chunk)
    expected = 4 + 4 * nchunks + data_bytes(n)
    if len(body) != expected:
        raise CodecError(f"{name} payload has {len(body)} bytes, expected {expected}")
    scales = np.frombuffer(body, dtype="<f4", count=nchunks, offset=4).astype(np.float32)
    if not np.isfinite(scales).all() or (scales < 0).any():
        raise CodecError(f"{name} payload has non-finite or negative scales")
    return chunk, scales


def _int8(kind: int) -> _Base:
    """int8: per-chunk scale absmax / 127, stochastic rounding, one byte per value."""
    chunk, levels = QUANT_CHUNK, _levels(8)

    def enc(x: np.ndarray, param: float | None, seed: int) -> bytes:
        n = x.size
        q = np.empty(n, np.int8)
        scales = np.empty(-(-n // chunk), np.float32)
        _kernels().int8_quantize(x, chunk, float(levels), np.uint64(seed), q, scales)
        return struct.pack("<I", chunk) + scales.astype("<f4").tobytes() + q.tobytes()

    def dec(body: memoryview, n: int, param: float | None) -> np.ndarray:
        got_chunk, scales = _check_chunked("int8", body, n, lambda n: n)
        q = np.frombuffer(body, dtype=np.int8, count=n, offset=4 + 4 * len(scales)).copy()
        if (q < -levels).any():
            raise CodecError(f"int8 payload has the out-of-range value {-levels - 1}")
        out = np.empty(n, np.float32)
        _kernels().int8_dequantize(q, scales, got_chunk, out)
        return out

    text = f"8-bit codes, a float32 scale per {chunk} values, stochastic rounding"
    return _Base(kind, enc, dec, error_feedback=False, help=text, chunk=chunk, levels=levels)


def _lowbit(kind: int, bits: int) -> _Base:
    """intB codecs (B = 4 or 2): per-chunk scale absmax / (2^(B-1) - 1), stochastic rounding, packed."""
    chunk, levels = QUANT_CHUNK, _levels(bits)
    name = f"int{bits}"
    vpb = 8 // bits

    def enc(x: np.ndarray, param: float | None, seed: int) -> bytes:
        n = x.size
        scales = np.empty(-(-n // chunk), np.float32)
        packed = np.empty(-(-n // vpb), np.uint8)
        _kernels().packed_quantize(x, chunk, bits, levels, np.uint64(seed), packed, scales)
        return struct.pack("<I", chunk) + scales.astype("<f4").tobytes() + packed.tobytes()

    def dec(body: memoryview, n: int, param: float | None) -> np.ndarray:
        got_chunk, scales = _check_chunked(name, body, n, lambda n: -(-n // vpb))
        packed = np.frombuffer(body, dtype=np.uint8, count=-(-n // vpb), offset=4 + 4 * len(scales)).copy()
        out = np.empty(n, np.float32)
        if _kernels().packed_dequantize(packed, scales, got_chunk, bits, levels, out) != 0:
            raise CodecError(f"{name} payload has out-of-range codes or non-zero padding")
        return out

    text = (f"{bits}-bit codes in -{levels}..{levels}, {vpb} per byte, a scale per {chunk} values, stochastic "
            "rounding; error feedback")
    return _Base(kind, enc, dec, error_feedback=True, help=text, chunk=chunk, levels=levels)


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
    used = _kernels().varint_gaps_encode(idx, gaps)
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
    if _kernels().varint_gaps_decode(gaps, n, idx) != 0:
        raise CodecError("topk payload has malformed indices: truncated, trailing bytes, out of range "
                         "or not strictly increasing")
    out = np.zeros(n, np.float32)
    out[idx] = vals
    return out


CODECS: dict[str, _Base] = {
    "fp32": _Base(1, _enc_fp32, _dec_fp32, error_feedback=False, help="float32 values, lossless"),
    "fp16": _Base(2, _enc_fp16, _dec_fp16, error_feedback=False,
                  help=f"float16 values (refuses |value| > {_FP16_MAX:g})"),
    "int8": _int8(3),
    "int4": _lowbit(5, 4),
    "int2": _lowbit(6, 2),
    "topk": _Base(4, _enc_topk, _dec_topk, error_feedback=True, needs_param=True,
                  help="the fraction F (0 < F <= 1) of largest |values| with their index gaps; error feedback"),
}


Codec = _Base  # the public name of a codec entry, for register_codec


def register_codec(name: str, codec: Codec) -> None:
    """Add a codec under `name` (then usable as `--codec name[+zstd]` by devices and the server that run this
    registration). Its payload kind byte must be new: decoders refuse a payload of another codec's kind."""
    if not name.isidentifier() or name in CODECS:
        raise CodecError(f"codec name {name!r} is taken or not an identifier")
    if not 0 < codec.kind < 256 or any(c.kind == codec.kind for c in CODECS.values()):
        raise CodecError(f"codec {name!r}: payload kind {codec.kind} is out of 1..255 or already used")
    CODECS[name] = codec


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


class Compressor(NamedTuple):
    """A lossless stage on top of any payload, named by a '+<name>' suffix."""

    compress: Callable[[bytes], bytes]
    decompress: Callable[[bytes, int], bytes]  # (data, size limit) -> payload; CodecError if corrupted
    help: str  # one line for CLIs (codec_choices)


COMPRESSORS: dict[str, Compressor] = {
    "zstd": Compressor(_zstd_compress, _zstd_decompress, "then compress the payload with zstd (level 9)"),
    "zlib": Compressor(_zlib_compress, _zlib_decompress, "then compress the payload with zlib (level 9)"),
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


def codec_choices() -> dict[str, str]:
    """Every form a codec name takes, with one line of help each, in the order to list them: the base
    codecs ('topk:F' for the one that takes a fraction), then the '+zstd' / '+zlib' suffixes."""
    out = {f"{name}:F" if base.needs_param else name: base.help for name, base in CODECS.items()}
    out.update({f"+{name}": c.help for name, c in COMPRESSORS.items()})
    return out


def codec_help(default: str | None = None) -> str:
    """One line for a --codec help: 'fp32 | fp16 | ... | topk:F, optionally +zstd or +zlib (default fp32)'."""
    forms = list(codec_choices())
    bases = [f for f in forms if not f.startswith("+")]
    suffixes = [f for f in forms if f.startswith("+")]
    text = " | ".join(bases) + ", optionally " + " or ".join(suffixes)
    return text if default is None else f"{text} (default {default})"


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
        payload = COMPRESSORS[spec.compressor].compress(payload)
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
        data = COMPRESSORS[spec.compressor].decompress(data, _max_payload(n))
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
