"""Thin, typed wrappers over `cryptography`: key agreement, KDF, AEAD, signatures, mask PRG,
Shamir secret sharing. Imports nothing of ours but :mod:`secfedtl.errors`."""
