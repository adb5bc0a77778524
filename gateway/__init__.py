"""Crafterse Forge gateway: the public API in front of Triton, and its command-line tools."""
