"""Generated gRPC stubs for proto/federation.proto (regenerate with `make proto`; see generate.py)."""
