"""memorywall.v1: generated protobuf and gRPC code. Regenerate with `python protos/generate.py`."""
