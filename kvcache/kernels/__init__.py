"""Compression codecs for KV tensors; importing the package registers every codec."""

from kvcache.kernels import cachegen, int8, raw  # noqa: F401 - registration
from kvcache.kernels.codec import codec_by_name, codec_names, decode, encode

__all__ = ["codec_by_name", "codec_names", "decode", "encode"]
