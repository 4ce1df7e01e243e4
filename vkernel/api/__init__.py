"""Thin gRPC servicers: decode, call the kernel, encode. No mm logic lives here."""
