"""Delta codecs: round trips against each codec's stated bound, error feedback, corrupted payloads."""

from __future__ import annotations

import hashlib
import struct

import numpy as np
import pytest
import zstandard
from fedpers import codec
from fedpers.codec import CODECS, CodecError, decode, encode, parse_codec

from tests.probes import modules_after

NAMES = ["fp32", "fp16", "int8", "int4", "int2", "topk:0.05", "topk:0.3", "topk:1"]
ALL = NAMES + [n + "+zstd" for n in NAMES] + ["int8+zlib", "topk:0.01+zlib"]
SHAPES = [(0,), (1,), (7,), (3, 5), (255,), (257,), (4, 3, 3, 3), (2000,)]


def _delta(shape, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(shape).astype(np.float32) * np.float32(0.01)
    if x.size > 3:
        x.reshape(-1)[1] = 0.5  # one outlier, as deltas have
    return x


QUANTIZERS = ("int8", "int4", "int2")


def _steps(x: np.ndarray, base: str) -> np.ndarray:
    """Each element's quantization step under codec `base`, computed as the codec states it from its
    own constants: the float32 max |x| / levels of its chunk of `chunk` elements."""
    entry = CODECS[base]
    flat = x.reshape(-1)
    out = np.empty(flat.size)
    for lo in range(0, flat.size, entry.chunk):
        chunk = flat[lo : lo + entry.chunk].astype(np.float64)
        out[lo : lo + entry.chunk] = np.float32(np.abs(chunk).max() / entry.levels)
    return out.reshape(x.shape)


def _within_a_step(y: np.ndarray, x: np.ndarray, base: str) -> np.ndarray:
    """The stated bound |y - x| < step, plus the float32 rounding of y = q * step itself."""
    err = np.abs(y.astype(np.float64) - x.astype(np.float64))
    step = _steps(x, base)
    return (err < step + np.abs(y) * 2.0**-24) | ((err == 0) & (step == 0))


def test_quantizer_constants_are_what_the_payload_says():
    """chunk and levels are each codec's own: the payload records the chunk, codes span +-levels."""
    assert {b: (CODECS[b].chunk, CODECS[b].levels) for b in QUANTIZERS} == {
        "int8": (codec.QUANT_CHUNK, 127), "int4": (codec.QUANT_CHUNK, 7), "int2": (codec.QUANT_CHUNK, 1)}
    x = _delta((3 * codec.QUANT_CHUNK + 5,))
    for base in QUANTIZERS:
        payload, _ = encode(base, x, None, rng_seed=1)
        (chunk,) = struct.unpack_from("<I", payload, codec._HEADER.size)
        assert chunk == CODECS[base].chunk
        y = decode(base, payload, x.shape)
        for lo in range(0, x.size, chunk):
            codes = np.round(y[lo : lo + chunk] / _steps(x, base)[lo]).astype(int)
            assert np.abs(codes).max() == CODECS[base].levels  # the chunk max maps onto the top code


def test_registry_names_parse():
    assert set(CODECS) == {"fp32", "fp16", "int8", "int4", "int2", "topk"}
    assert parse_codec("topk:0.01+zstd") == codec.CodecSpec("topk", 0.01, "zstd")
    assert parse_codec("INT8").name == "int8"
    assert parse_codec("topk:0.05+zlib").name == "topk:0.05+zlib"


@pytest.mark.parametrize("bad", ["fp64", "topk", "topk:0", "topk:1.5", "topk:x", "fp32:3", "int8+lz4", ""])
def test_bad_codec_names_are_refused(bad):
    with pytest.raises(CodecError):
        parse_codec(bad)


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("shape", SHAPES)
def test_round_trip_within_stated_bound(name, shape):
    x = _delta(shape)
    payload, residual = encode(name, x, None, rng_seed=7)
    y = decode(name, payload, shape)
    assert y.dtype == np.float32 and y.shape == shape
    base = parse_codec(name).base
    if base == "fp32":
        np.testing.assert_array_equal(y, x)
        assert residual is None
    elif base == "fp16":
        np.testing.assert_allclose(y, x, rtol=1e-3, atol=1e-7)
        assert residual is None
    elif base == "int8":
        assert _within_a_step(y, x, base).all()
        assert residual is None
    elif base in ("int4", "int2"):
        assert _within_a_step(y, x, base).all()
        entry = CODECS[base]
        assert len(np.unique(y.reshape(-1)[: entry.chunk])) <= 2 * entry.levels + 1
        # error feedback: sent + carried = input (up to float32 rounding of the subtraction)
        assert residual is not None and residual.shape == shape
        np.testing.assert_allclose(y + residual, x, rtol=0, atol=1e-7)
    else:
        # top-k: what was sent plus what is carried is exactly the input, and the sent part is the largest
        assert residual is not None and residual.shape == shape
        np.testing.assert_array_equal(y + residual, x)
        k = codec.topk_count(x.size, parse_codec(name).param)
        assert np.count_nonzero(y) <= k
        if x.size:
            sent = np.abs(x[y != 0]) if np.count_nonzero(y) else np.zeros(1)
            assert sent.min() >= np.abs(residual).max()


def test_encoding_is_deterministic_in_its_seed():
    x = _delta((1000,))
    a, _ = encode("int8", x, None, rng_seed=1)
    b, _ = encode("int8", x, None, rng_seed=1)
    c, _ = encode("int8", x, None, rng_seed=2)
    assert a == b and a != c


@pytest.mark.parametrize("name", QUANTIZERS)
def test_stochastic_rounding_is_unbiased(name):
    x = _delta((512,), seed=3)
    mean = np.mean([decode(name, encode(name, x, None, rng_seed=s)[0], x.shape) for s in range(400)], axis=0)
    steps = _steps(x, name)
    # each sample has |error| < step; the mean of 400 independent ones is within a few step/sqrt(400)
    assert (np.abs(mean - x) <= 0.25 * steps + 1e-12).all()


def test_int8_error_bound_on_extreme_values():
    x = np.array([3.0e4, -3.0e4, 1e-30, 0.0, 1.0, -1.0] * 100, np.float32)
    y = decode("int8", encode("int8", x, None, rng_seed=5)[0], x.shape)
    assert _within_a_step(y, x, "int8").all()
    assert y[0] == pytest.approx(3.0e4, rel=1e-6)  # the chunk max is exact


def test_residual_is_folded_into_codecs_without_error_feedback():
    x, r = _delta((100,), 1), _delta((100,), 2)
    payload, new_residual = encode("fp32", x, r)
    np.testing.assert_array_equal(decode("fp32", payload, x.shape), x + r)
    assert new_residual is None


def test_topk_with_error_feedback_converges_on_a_toy_problem():
    """Compressed gradient descent on 0.5 * ||w - target||^2 sending 1% per step reaches the target."""
    rng = np.random.default_rng(0)
    target = rng.standard_normal(2000).astype(np.float32)
    w = np.zeros_like(target)
    residual = None
    sent_total = np.zeros_like(target)
    steps_total = np.zeros_like(target)
    for step in range(1500):
        delta = -0.01 * (w - target)
        payload, residual = encode("topk:0.01+zstd", delta, residual, rng_seed=step)
        update = decode("topk:0.01+zstd", payload, w.shape)
        w += update
        sent_total += update
        steps_total += delta
    assert np.linalg.norm(w - target) < 1e-3 * np.linalg.norm(target)
    # error feedback loses nothing: all deltas = all that was sent + what is still carried
    np.testing.assert_allclose(steps_total, sent_total + residual, atol=1e-3)


def test_topk_without_error_feedback_loses_mass():
    """The same scheme with the residual dropped each step leaves the small coordinates behind."""
    rng = np.random.default_rng(0)
    deltas = [rng.standard_normal(1000).astype(np.float32) for _ in range(50)]
    with_ef, without_ef, residual = np.zeros(1000, np.float32), np.zeros(1000, np.float32), None
    for i, d in enumerate(deltas):
        p, residual = encode("topk:0.05", d, residual, i)
        with_ef += decode("topk:0.05", p, d.shape)
        without_ef += decode("topk:0.05", encode("topk:0.05", d, None, i)[0], d.shape)
    truth = np.sum(deltas, axis=0)
    assert np.linalg.norm(truth - with_ef) < 0.5 * np.linalg.norm(truth - without_ef)


def test_compression_ratios():
    x = _delta((100_000,))
    fp32 = len(encode("fp32", x)[0])
    assert len(encode("fp16", x)[0]) < 0.51 * fp32
    assert len(encode("int8", x)[0]) < 0.26 * fp32
    assert len(encode("int4", x)[0]) < 0.14 * fp32
    assert len(encode("int2", x)[0]) < 0.08 * fp32
    assert len(encode("topk:0.01+zstd", x)[0]) < fp32 / 20


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_delta_is_refused(bad):
    x = _delta((10,))
    x[3] = bad
    for name in NAMES:
        with pytest.raises(CodecError, match="non-finite"):
            encode(name, x)


def test_fp16_overflow_and_residual_mismatch_are_refused():
    with pytest.raises(CodecError, match="fp16"):
        encode("fp16", np.array([1e6], np.float32))
    with pytest.raises(CodecError, match="residual"):
        encode("topk:0.1", _delta((10,)), np.zeros(9, np.float32))


# --- corrupted and mismatched payloads ------------------------------------------------------------


@pytest.mark.parametrize("name", ALL)
def test_truncated_extended_and_reshaped_payloads_raise(name):
    x = _delta((300,))
    payload, _ = encode(name, x, None, 1)
    for bad in (payload[:-1], payload[: len(payload) // 2], payload + b"\0", b"", payload[:5]):
        with pytest.raises(CodecError):
            decode(name, bad, x.shape)
    with pytest.raises(CodecError):
        decode(name, payload, (301,))


@pytest.mark.parametrize("name", NAMES)
def test_wrong_codec_or_magic_raises(name):
    x = _delta((64,))
    payload, _ = encode(name, x)
    other = "fp16" if name != "fp16" else "fp32"
    with pytest.raises(CodecError):
        decode(other, payload, x.shape)
    with pytest.raises(CodecError, match="magic"):
        decode(name, b"XXXX" + payload[4:], x.shape)


def test_corrupted_values_raise():
    x = _delta((64,))
    header = codec._HEADER.size
    payload = bytearray(encode("fp32", x)[0])
    payload[header : header + 4] = struct.pack("<f", float("nan"))
    with pytest.raises(CodecError, match="non-finite"):
        decode("fp32", bytes(payload), x.shape)
    payload = bytearray(encode("int8", x)[0])
    payload[header + 4 : header + 8] = struct.pack("<f", float("inf"))  # the first scale
    with pytest.raises(CodecError, match="scales"):
        decode("int8", bytes(payload), x.shape)
    payload = bytearray(encode("int8", x)[0])
    payload[-1] = 0x80  # -128 is never produced
    with pytest.raises(CodecError, match="-128"):
        decode("int8", bytes(payload), x.shape)


def _topk_payload(n: int, gaps: bytes, k: int, values: np.ndarray | None = None) -> bytes:
    """A hand-made top-k payload: header, k, k float32 values, then the given index-gap bytes."""
    vals = np.ones(k, np.float32) if values is None else values
    return (codec._HEADER.pack(codec.MAGIC, CODECS["topk"].kind, n) + codec._TOPK_HEADER.pack(k)
            + vals.astype("<f4").tobytes() + gaps)


def test_topk_payload_layout_is_what_we_think():
    good = _topk_payload(1000, bytes([5, 1, 0x81, 0x01]), 3)  # indices 5, 6, 6 + 129 = 135
    y = decode("topk:0.01", good, (1000,))
    assert list(np.flatnonzero(y)) == [5, 6, 135]
    x = np.zeros(1000, np.float32)
    x[[5, 6, 135]] = 1.0
    assert encode("topk:0.003", x)[0] == good


@pytest.mark.parametrize("name, bad_byte", [("int2", 0xFF), ("int4", 0xFF)])
def test_lowbit_invalid_codes_and_padding_raise(name, bad_byte):
    x = _delta((9,))  # 9 values: the last byte has padding
    payload = bytearray(encode(name, x)[0])
    payload[-2] = bad_byte  # int2: code 3 / int4: code 15 are never produced
    with pytest.raises(CodecError, match="out-of-range codes"):
        decode(name, bytes(payload), x.shape)
    payload = bytearray(encode(name, x)[0])
    payload[-1] |= 0x80  # a padding bit
    with pytest.raises(CodecError, match="padding"):
        decode(name, bytes(payload), x.shape)


def test_bad_topk_indices_raise():
    n = 1000
    cases = [
        (_topk_payload(n, bytes([5, 0, 3]), 3), "malformed"),  # repeated index
        (_topk_payload(n, bytes([0xE7, 0x07]), 1), "malformed"),  # index 999 is fine ...
        (_topk_payload(n, bytes([0xE8, 0x07]), 1), "malformed"),  # ... index 1000 is out of range
        (_topk_payload(n, bytes([100, 0xFF, 0x07]), 2), "malformed"),  # 100 + 1023 out of range
        (_topk_payload(n, bytes([5, 0x81]), 2), "malformed"),  # varint cut short
        (_topk_payload(n, bytes([5, 6, 7]), 2), "malformed"),  # trailing byte
        (_topk_payload(n, bytes([0x80] * 11), 1), "malformed"),  # varint too long
        (_topk_payload(n, bytes([5]), 2), "too few"),
        (_topk_payload(n, bytes(2000), 2000), "claims"),
    ]
    for i, (payload, match) in enumerate(cases):
        if i == 1:
            assert np.flatnonzero(decode("topk:0.01", payload, (n,))).tolist() == [999]
            continue
        with pytest.raises(CodecError, match=match):
            decode("topk:0.01", payload, (n,))
    nan = _topk_payload(n, bytes([5]), 1, np.array([np.nan], np.float32))
    with pytest.raises(CodecError, match="non-finite"):
        decode("topk:0.01", nan, (n,))


def test_corrupted_and_oversized_compressed_frames_raise():
    x = _delta((300,))
    payload, _ = encode("int8+zstd", x)
    with pytest.raises(CodecError, match="zstd"):
        decode("int8+zstd", payload[:-3], x.shape)
    with pytest.raises(CodecError, match="zstd"):
        decode("int8+zstd", b"not a zstd frame at all", x.shape)
    bomb = zstandard.ZstdCompressor().compress(b"\0" * 10_000_000)
    with pytest.raises(CodecError, match="more than"):
        decode("int8+zstd", bomb, x.shape)
    with pytest.raises(CodecError, match="zlib"):
        decode("int8+zlib", encode("int8+zlib", x)[0][:-2], x.shape)


def test_derive_seed_is_stable_and_distinct():
    assert codec.derive_seed(3, 7, "fc.weight") == codec.derive_seed(3, 7, "fc.weight")
    assert len({codec.derive_seed(d, r) for d in range(20) for r in range(20)}) == 400
    assert 0 <= codec.derive_seed("x") < 2**64


def test_codec_names_load_no_kernels_until_the_first_encode_and_never_numba():
    """CLIs parse and list codec names at start-up; only encoding or decoding loads the kernels, which
    are plain numpy: a device encodes and a server decodes without numba."""
    light = modules_after("import fedpers.codec as c\nassert c.parse_codec('topk:0.1+zstd').base == 'topk'")
    assert "fedpers.codec" in light and not {"numba", "fedpers.codec_kernels"} & light
    used = modules_after("import numpy as np, fedpers.codec as c\nfor n in ('int8', 'int4', 'topk:0.5'):\n"
                         "    c.decode(n, c.encode(n, np.ones(9, np.float32))[0], (9,))")
    assert {"fedpers.codec_kernels", "fedpers.rng"} <= used and "numba" not in used


def test_codec_choices_list_every_form_and_each_one_parses():
    """What CLIs show for --codec: every base codec and compressor, and each listed form is accepted."""
    choices = codec.codec_choices()
    assert list(choices) == ["fp32", "fp16", "int8", "int4", "int2", "topk:F", "+zstd", "+zlib"]
    assert all(text and "\n" not in text for text in choices.values())
    for form in choices:
        name = form.replace(":F", ":0.05") if not form.startswith("+") else "int8" + form
        assert parse_codec(name).name == name
    assert {parse_codec(f.replace(":F", ":0.5")).base for f in choices if not f.startswith("+")} == set(CODECS)
    assert {f[1:] for f in choices if f.startswith("+")} == set(codec.COMPRESSORS)
    expected = "fp32 | fp16 | int8 | int4 | int2 | topk:F, optionally +zstd or +zlib"
    assert codec.codec_help() == expected and codec.codec_help("fp32") == expected + " (default fp32)"


def test_payloads_are_bit_stable():
    """The numpy kernels encode exactly what the numba kernels of the first version did (same float64
    arithmetic, same counter-based draws): devices and servers of either version agree. The digests
    were taken from both implementations."""
    x = (np.random.default_rng(7).standard_normal(1000) * 0.01).astype(np.float32)
    digests = {"int8": "6bfec06f33edeea2", "int4": "17c610d5f78f06e0", "int2": "f5c7714fbd660689",
               "topk:0.05": "7158eaae1d0d8379"}
    for name, digest in digests.items():
        payload, _ = codec.encode(name, x, rng_seed=11)
        assert hashlib.sha256(payload).hexdigest()[:16] == digest, name
