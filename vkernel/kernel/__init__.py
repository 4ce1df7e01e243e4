"""The kernel proper: pure Python + numpy, no gRPC. Names follow Linux's mm."""
