"""The `none` codec: the tensor's own bytes, in its own dtype. The baseline every other codec's
ratio is measured against (as fp16), and the choice when the network is not the bottleneck."""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from kvcache.kernels.blob import BlobHeader, CorruptBlob
from kvcache.kernels.codec import DTYPES, body_tensor, element_count, register, tensor_bytes


@register
class RawCodec:
    name: ClassVar[str] = "none"
    version: ClassVar[int] = 1

    def encode_body(self, kv: torch.Tensor) -> tuple[dict[str, Any], bytes]:
        return {}, tensor_bytes(kv)

    @classmethod
    def decode_body(
        cls, header: BlobHeader, body: memoryview, device: torch.device
    ) -> torch.Tensor:
        dtype = DTYPES[header.dtype]
        count = element_count(header.shape)
        if body.nbytes != count * dtype.itemsize:
            raise CorruptBlob(f"{body.nbytes} body bytes cannot hold {list(header.shape)} {dtype}")
        return body_tensor(body, 0, count, dtype).reshape(header.shape).to(device)
