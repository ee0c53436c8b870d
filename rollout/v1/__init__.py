"""Generated gRPC / protobuf code for protos/rollout/v1 (written by setup.py at build time)."""
