"""Generated protobuf and gRPC code for the vkernel.v1 API (make proto). Do not edit."""
