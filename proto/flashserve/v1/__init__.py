"""Generated gRPC stubs for flashserve/v1/attention.proto (python scripts/gen_proto.py)."""
