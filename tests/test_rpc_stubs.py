"""The committed stubs in common/rpc are exactly what `make proto` produces."""

from pathlib import Path

import pytest
from fedpers.rpc import generate


def test_committed_stubs_match_a_fresh_generation(tmp_path: Path) -> None:
    fresh = generate.generate(tmp_path)
    assert [p.name for p in fresh] == list(generate.GENERATED)
    for path in fresh:
        committed = generate.OUT_DIR / path.name
        assert committed.exists(), f"{committed} is missing: run `make proto`"
        assert committed.read_bytes() == path.read_bytes(), f"{committed.name} is stale: run `make proto`"


def test_grpc_stub_imports_its_messages_relative() -> None:
    text = (generate.OUT_DIR / "federation_pb2_grpc.py").read_text()
    assert "from . import federation_pb2 as federation__pb2" in text
    assert "\nimport federation_pb2" not in text


def test_stubs_import_as_a_package() -> None:
    from fedpers.rpc import federation_pb2, federation_pb2_grpc

    assert federation_pb2.DESCRIPTOR.package == "fedpers.v1"
    assert hasattr(federation_pb2_grpc, "FederationStub")
    assert set(federation_pb2.DESCRIPTOR.services_by_name["Federation"].methods_by_name) == {
        "Enroll", "Join", "GetTask", "DownloadModel", "UploadUpdate", "GetStatus", "ReportChoice"}


def test_generate_reports_protoc_failure(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(generate, "PROTO_DIR", tmp_path)  # no federation.proto there
    with pytest.raises(generate.GenerateError, match="protoc exited"):
        generate.generate(tmp_path / "out")
