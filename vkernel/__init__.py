"""vkernel: a virtual Linux memory-management kernel served over gRPC."""

__version__ = "0.1.0"
