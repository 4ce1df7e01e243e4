"""vkclient: the vkernel SDK."""
