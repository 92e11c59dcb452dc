"""A value read from the cluster, still in the buffers it arrived in."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(slots=True)
class Value:
    """Verified bytes of one chunk as a sequence of frames: reading it costs no copy until the
    caller asks for one (`bytes(value)`, or `readinto` straight into its own buffer)."""

    frames: tuple[memoryview, ...]
    size: int
    meta: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return self.size

    def __bytes__(self) -> bytes:
        return b"".join(self.frames)

    def readinto(self, target: Any) -> int:
        """Copy the value into a writable buffer of at least `size` bytes; returns bytes copied."""
        view = memoryview(target).cast("B")
        if view.nbytes < self.size:
            raise ValueError(f"target holds {view.nbytes} bytes, value has {self.size}")
        position = 0
        for frame in self.frames:
            view[position : position + len(frame)] = frame
            position += len(frame)
        return position
