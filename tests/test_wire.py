"""Every wire pair round-trips; chunk streams are verified on the way back together."""

import hashlib
import random

import numpy as np
import pytest
from fedpers import personalization as pers
from fedpers import wire
from fedpers.rpc import federation_pb2 as pb

DTYPES = [np.float32, np.float16, np.int8, np.int32, np.int64, np.uint8]


class Maker:
    """Seeded random values for round-trip tests."""

    def __init__(self, seed: int) -> None:
        self.rng = np.random.default_rng(seed)
        self.py = random.Random(seed)

    def name(self) -> str:
        return "".join(self.py.choice("abcdefgh:_0123") for _ in range(self.py.randint(1, 12)))

    def f32(self) -> float:  # exactly representable in a proto float
        return float(np.float32(self.rng.standard_normal()))

    def int63(self) -> int:
        return self.py.randint(1, wire.INT63_MAX)

    def array(self, dtype=None) -> np.ndarray:
        dtype = dtype or self.py.choice(DTYPES)
        shape = tuple(self.py.randint(0 if self.py.random() < 0.1 else 1, 6) for _ in range(self.py.randint(0, 4)))
        return (self.rng.standard_normal(shape) * 50).astype(dtype)

    def arrays(self, n: int = 5) -> dict[str, np.ndarray]:
        out = {}
        while len(out) < n:
            out[self.name()] = self.array()
        return out

    def metrics(self) -> dict[str, float]:
        return {self.name(): float(self.rng.standard_normal()) for _ in range(self.py.randint(0, 4))}

    def names(self) -> tuple[str, ...]:
        return tuple(self.name() for _ in range(self.py.randint(0, 5)))

    def config(self) -> wire.TrainingConfig:
        return wire.TrainingConfig(
            local_epochs=self.py.randint(1, 9), batch_size=self.py.randint(1, 512), learning_rate=self.f32(),
            shared_tensors=self.names(), personal_layers=self.names(), codec=self.py.choice(["fp32", "topk:0.05"]),
            deadline_unix=self.rng.uniform(0, 2e9), dp_clip_norm=self.rng.uniform(0, 5),
            dp_noise_multiplier=self.rng.uniform(0, 3), dp_delta=self.rng.uniform(0, 1e-3),
            personalization=self.hyperparams() if self.py.random() < 0.7 else None,
        )

    def hyperparams(self) -> pers.Hyperparams:
        """A registered method with every hyperparameter it takes drawn within its range."""
        method = pers.METHODS[self.py.choice(sorted(pers.METHODS))]
        values: dict = {}
        for p in method.params:
            if p.choices:
                values[p.name] = self.py.choice(p.choices)
            elif isinstance(p.default, int):
                values[p.name] = self.py.randint(int(p.low), int(p.high))
            else:
                values[p.name] = self.rng.uniform(p.low, p.high)
        return method.hyperparams(values)


SEEDS = range(5)


def _assert_arrays_equal(a: dict, b: dict) -> None:
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape
        np.testing.assert_array_equal(a[k], b[k])


@pytest.mark.parametrize("seed", SEEDS)
def test_array_tensor_round_trip(seed: int) -> None:
    m = Maker(seed)
    for dtype in DTYPES:
        arr = m.array(dtype)
        t = wire.tensor_from_proto(wire.tensor_to_proto(wire.array_to_wire("x", arr)))
        got = t.to_array()
        assert got.dtype == np.dtype(dtype) and got.shape == arr.shape
        np.testing.assert_array_equal(got, arr)
        got[...] = 0  # writable


@pytest.mark.parametrize("seed", SEEDS)
def test_arrays_blob_round_trip_and_determinism(seed: int) -> None:
    arrays = Maker(seed).arrays()
    blob = wire.arrays_to_blob(arrays)
    _assert_arrays_equal(wire.arrays_from_blob(blob), arrays)
    assert wire.arrays_to_blob(dict(reversed(list(arrays.items())))) == blob


def test_big_endian_array_is_sent_little_endian() -> None:
    arr = np.arange(6, dtype=">i4").reshape(2, 3)
    t = wire.array_to_wire("x", arr)
    assert t.data == np.arange(6, dtype="<i4").tobytes()
    np.testing.assert_array_equal(t.to_array(), arr)


@pytest.mark.parametrize("seed", SEEDS)
def test_encoded_tensor_round_trip(seed: int) -> None:
    m = Maker(seed)
    payload = m.rng.bytes(m.py.randint(0, 100))
    t = wire.encoded_to_wire("fc:w", (3, 4), "int8", payload)
    back = wire.tensorset_from_blob(wire.tensorset_to_blob([t]))
    assert back == [t]
    with pytest.raises(wire.MalformedMessage, match="int8"):
        back[0].to_array()


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("chunk_size", [1, 7, 1000, wire.CHUNK_SIZE])
def test_chunking_round_trip(seed: int, chunk_size: int) -> None:
    blob = wire.arrays_to_blob(Maker(seed).arrays(3))
    chunks = list(wire.chunk_blob(blob, chunk_size))
    assert all(len(c.data) <= chunk_size for c in chunks)
    assert all(c.total_size == len(blob) and c.sha256 == hashlib.sha256(blob).digest() for c in chunks)
    assert wire.join_chunks(chunks, expected_total=len(blob), max_size=len(blob)) == blob
    assert wire.join_chunks(iter(chunks)) == blob


def test_large_blob_is_split_at_one_mebibyte() -> None:
    blob = np.random.default_rng(0).bytes(2 * wire.CHUNK_SIZE + 5)
    chunks = list(wire.chunk_blob(blob))
    assert [len(c.data) for c in chunks] == [wire.CHUNK_SIZE, wire.CHUNK_SIZE, 5]
    assert [c.offset for c in chunks] == [0, wire.CHUNK_SIZE, 2 * wire.CHUNK_SIZE]
    assert wire.join_chunks(chunks) == blob


def test_empty_blob_is_one_empty_chunk() -> None:
    chunks = list(wire.chunk_blob(b""))
    assert len(chunks) == 1 and chunks[0].total_size == 0
    assert wire.join_chunks(chunks) == b""


def test_resumed_download_joins_from_an_offset() -> None:
    blob = bytes(range(256)) * 40
    have = blob[:3000]
    rest = list(wire.chunk_blob(blob, 1000, start=len(have)))
    assert rest[0].offset == 3000
    assert wire.join_chunks(rest, received=have) == blob
    with pytest.raises(wire.ChunkOrderError):
        wire.join_chunks(rest, received=blob[:2000])


def _chunks(blob: bytes = b"0123456789" * 10, size: int = 30) -> list:
    return list(wire.chunk_blob(blob, size))


def test_truncated_stream() -> None:
    with pytest.raises(wire.TruncatedStream, match="90 of 100"):
        wire.join_chunks(_chunks()[:-1])
    with pytest.raises(wire.TruncatedStream, match="before any chunk"):
        wire.join_chunks([])


def test_checksum_mismatch() -> None:
    chunks = _chunks()
    chunks[1].data = b"X" + chunks[1].data[1:]
    with pytest.raises(wire.ChecksumMismatch, match="does not match"):
        wire.join_chunks(chunks)
    with pytest.raises(wire.ChecksumMismatch):
        wire.join_chunks(_chunks(), expected_sha256=b"\0" * 32)
    chunks = _chunks()
    chunks[2].sha256 = b"\1" * 32
    with pytest.raises(wire.ChecksumMismatch, match="chunk 3"):
        wire.join_chunks(chunks)


def test_out_of_order_and_overlapping_chunks() -> None:
    chunks = _chunks()
    with pytest.raises(wire.ChunkOrderError, match="starts at byte 60, expected 30"):
        wire.join_chunks([chunks[0], chunks[2], chunks[1], chunks[3]])
    with pytest.raises(wire.ChunkOrderError):
        wire.join_chunks([chunks[0], chunks[0]])


def test_oversize() -> None:
    with pytest.raises(wire.Oversize, match="exceeds the limit of 99"):
        wire.join_chunks(_chunks(), max_size=99)
    with pytest.raises(wire.Oversize):
        wire.join_chunks(_chunks(), expected_total=1000, max_size=500)
    lying = _chunks()
    for c in lying:
        c.total_size = 50  # announces less than it sends
    with pytest.raises(wire.Oversize, match="more than the announced 50"):
        wire.join_chunks(lying)
    big = pb.Chunk(offset=0, data=b"x" * (wire.MAX_CHUNK_SIZE + 1), total_size=wire.MAX_CHUNK_SIZE + 1)
    with pytest.raises(wire.Oversize, match="chunk 1"):
        wire.join_chunks([big])


def test_inconsistent_total_size() -> None:
    chunks = _chunks()
    chunks[1].total_size = 101
    with pytest.raises(wire.MalformedMessage, match="chunk 2 announces total size 101"):
        wire.join_chunks(chunks)


def test_malformed_tensors_are_refused() -> None:
    with pytest.raises(wire.MalformedMessage, match="not a valid TensorSet"):
        wire.tensorset_from_blob(b"\xff\xff\xff")
    bad_len = pb.Tensor(name="w", shape=[2, 2], dtype=pb.FLOAT32, data=b"\0" * 12)
    with pytest.raises(wire.MalformedMessage, match="'w': 12 data bytes"):
        wire.tensor_from_proto(bad_len)
    with pytest.raises(wire.MalformedMessage, match="dtype"):
        wire.tensor_from_proto(pb.Tensor(name="w", shape=[1], data=b"\0" * 4))
    with pytest.raises(wire.MalformedMessage, match="negative"):
        wire.tensor_from_proto(pb.Tensor(name="w", shape=[-1], dtype=pb.UINT8))
    with pytest.raises(wire.MalformedMessage, match="empty name"):
        wire.tensor_from_proto(pb.Tensor(shape=[1], dtype=pb.UINT8, data=b"\0"))
    twice = pb.TensorSet(tensors=[wire.tensor_to_proto(wire.array_to_wire("a", np.zeros(1, np.uint8)))] * 2)
    with pytest.raises(wire.MalformedMessage, match="'a' occurs twice"):
        wire.tensorset_from_blob(twice.SerializeToString())
    with pytest.raises(wire.MalformedMessage, match="float64"):
        wire.array_to_wire("x", np.zeros(2))


@pytest.mark.parametrize("seed", SEEDS)
def test_record_round_trips(seed: int) -> None:
    m = Maker(seed)
    er = wire.EnrollRequest(enroll_token=m.name(), device_name=m.name().replace(":", "-").lstrip("_-") or "d",
                            request_id=m.name() + "r" * 16)
    assert wire.enroll_request_from_proto(wire.enroll_request_to_proto(er)) == er
    ep = wire.EnrollReply(device_id=m.int63(), device_secret=m.name())
    assert wire.enroll_reply_from_proto(wire.enroll_reply_to_proto(ep)) == ep
    assert m.name() not in repr(ep) or "<hidden>" in repr(ep)
    jr = wire.JoinRequest(device_id=m.int63(), device_secret=m.name())
    assert wire.join_request_from_proto(wire.join_request_to_proto(jr)) == jr
    jp = wire.JoinReply(device_id=m.int63(), session_token=m.name())
    assert wire.join_reply_from_proto(wire.join_reply_to_proto(jp)) == jp
    cfg = m.config()
    assert wire.training_config_from_proto(wire.training_config_to_proto(cfg)) == cfg
    for kind in wire.TaskKind:
        task = wire.Task(kind=kind, round_id=m.int63(), base_version=m.int63(),
                         config=cfg if kind != wire.TaskKind.WAIT else None,
                         retry_after_seconds=abs(m.f32()), model_ini=f"[{m.name()}]\ntype = input\n")
        assert wire.task_from_proto(wire.task_to_proto(task)) == task
    acc = {c: float(m.rng.uniform(0, 1)) for c in m.py.sample(pers.CANDIDATES, m.py.randint(1, 4))}
    cr = wire.ChoiceRequest(version=m.int63(), val_accuracy=acc, val_examples=m.py.randint(1, 10_000))
    assert wire.choice_request_from_proto(wire.choice_request_to_proto(cr)) == cr
    ask = wire.ChoiceRequest(version=m.int63(), val_accuracy={}, val_examples=0)  # no validation: only asks
    assert wire.choice_request_from_proto(wire.choice_request_to_proto(ask)) == ask
    for decided in (True, False):
        cp = wire.ChoiceReply(decided=decided, fleet_default=m.py.choice(pers.CANDIDATES) if decided else "",
                              retry_after_seconds=abs(m.f32()) % 60, reported=m.py.randint(0, 99),
                              expected=m.py.randint(0, 99))
        assert wire.choice_reply_from_proto(wire.choice_reply_to_proto(cp)) == cp
    dr = wire.DownloadRequest(version=m.int63(), offset=m.int63())
    assert wire.download_request_from_proto(wire.download_request_to_proto(dr)) == dr
    hdr = wire.UpdateHeader(round_id=m.int63(), base_version=m.int63(), num_examples=m.int63(),
                            total_size=m.int63(), sha256=m.rng.bytes(32), codec="int8+zstd", metrics=m.metrics())
    assert wire.update_header_from_proto(wire.update_header_to_proto(hdr)) == hdr
    ur = wire.UploadReply(accepted=bool(seed % 2), message=m.name(), updates_in_round=m.py.randint(0, 99))
    assert wire.upload_reply_from_proto(wire.upload_reply_to_proto(ur)) == ur
    rounds = tuple(wire.RoundSummary(round_id=m.int63(), version=m.int63(), state=m.py.choice(["open", "closed"]),
                                     devices=m.py.randint(0, 50), metrics=m.metrics(),
                                     late_updates=m.py.randint(0, 9)) for _ in range(3))
    st = wire.Status(version=m.int63(), current_round=m.int63(), round_state="open", rounds_completed=3,
                     rounds_target=10, devices_joined=7, finished=bool(seed % 2), rounds=rounds, problem=m.name(),
                     late_updates=m.py.randint(0, 99))
    assert wire.status_from_proto(wire.status_to_proto(st)) == st
    assert wire.status_from_json(wire.status_to_json(st)) == st


def test_refusal_kind_round_trips_through_trailing_metadata() -> None:
    class Failed:  # what grpc.RpcError offers: the trailing metadata of the call
        def __init__(self, pairs):
            self.pairs = pairs

        def trailing_metadata(self):
            return self.pairs

    for kind in wire.Refusal:
        assert wire.refusal_of(Failed(wire.refusal_metadata(kind))) is kind
    assert wire.refusal_of(Failed(())) is None
    assert wire.refusal_of(Failed(((wire.REFUSAL_KEY, "NoSuchKind"),))) is None
    assert wire.refusal_of(ValueError("not an RPC error")) is None


@pytest.mark.parametrize("seed", SEEDS)
def test_upload_stream_round_trip(seed: int) -> None:
    m = Maker(seed)
    blob = wire.arrays_to_blob(m.arrays(2))
    hdr = wire.UpdateHeader(round_id=1, base_version=0, num_examples=10, total_size=len(blob),
                            sha256=wire.sha256(blob), metrics=m.metrics())
    header, chunks = wire.split_upload(wire.upload_messages(hdr, blob, chunk_size=17))
    assert header == hdr
    assert wire.join_chunks(chunks, header.total_size, expected_sha256=header.sha256) == blob


def test_upload_stream_shape_errors() -> None:
    with pytest.raises(wire.TruncatedStream, match="before its header"):
        wire.split_upload(iter([]))
    with pytest.raises(wire.MalformedMessage, match="start with"):
        wire.split_upload([pb.UploadMessage(chunk=pb.Chunk())])
    hdr = pb.UploadMessage(header=pb.UpdateHeader(round_id=1))
    _, chunks = wire.split_upload([hdr, hdr])
    with pytest.raises(wire.MalformedMessage, match="exactly one header"):
        list(chunks)


def test_auth_metadata() -> None:
    assert wire.auth_metadata(12, "tok") == (("x-fedpers-device", "12"), ("x-fedpers-token", "tok"))


def test_the_personalization_travels_checked() -> None:
    good = pers.get("ditto").parse("lam=0.5,personal_epochs=3")
    msg = wire.training_config_to_proto(wire.TrainingConfig(personalization=good))
    assert wire.training_config_from_proto(msg).personalization == good
    cases = [
        ("method", "fedfoo", "unknown personalization method 'fedfoo'"),
        ("method", "x" * 300, "method name must be"),
        ("lam", 1e9, "lam must be in"),
        ("personal_epochs", 0, "personal_epochs must be in"),
        ("head_epochs", 7, "ditto does not take ['head_epochs']"),  # a value for a parameter it does not take
        ("ft_scope", "body", "ft_scope must be one of"),
        ("val_fraction", float("nan"), "val_fraction must be in"),
    ]
    for key, value, match in cases:
        bad = pb.TrainingConfig()
        bad.CopyFrom(msg)
        setattr(bad.personalization, key, value)
        with pytest.raises(wire.MalformedMessage, match=match.replace("[", r"\[").replace("(", r"\(")):
            wire.training_config_from_proto(bad)
    assert wire.training_config_from_proto(pb.TrainingConfig()).personalization is None


def test_the_choice_exchange_is_bounded() -> None:
    def request(**kw) -> pb.ChoiceRequest:
        msg = pb.ChoiceRequest(version=3, val_examples=kw.pop("val_examples", 7))
        for k, v in kw.pop("acc", {"global": 0.5, "local_only": 0.75}).items():
            msg.val_accuracy[k] = v
        return msg

    assert wire.choice_request_from_proto(request()).val_accuracy == {"global": 0.5, "local_only": 0.75}
    bad = [
        (request(acc={"global": 0.5, "secret_model": 0.9}), "candidates among"),
        (request(acc={"global": 1.5}), "not an accuracy"),
        (request(acc={"global": float("nan")}), "not an accuracy"),
        (request(acc={"global": -0.1}), "not an accuracy"),
        (request(val_examples=-1), "val_examples must be in"),
        (request(val_examples=wire.MAX_VAL_EXAMPLES + 1), "val_examples must be in"),
        (request(val_examples=0), "scores need validation examples"),
        (request(acc={}), "scores need validation examples"),
        (pb.ChoiceRequest(version=-2, val_examples=1, val_accuracy={"global": 1.0}), "version must be"),
    ]
    for msg, match in bad:
        with pytest.raises(wire.MalformedMessage, match=match):
            wire.choice_request_from_proto(msg)
    with pytest.raises(wire.MalformedMessage, match="fleet_default must be one of"):
        wire.choice_reply_from_proto(pb.ChoiceReply(decided=True, fleet_default="rm -rf"))
    undecided = wire.choice_reply_from_proto(pb.ChoiceReply(decided=False, fleet_default="global",
                                                            retry_after_seconds=1e9))
    assert undecided.fleet_default == "" and undecided.retry_after_seconds == 60.0
