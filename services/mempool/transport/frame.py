"""Wire header shared by the byte-stream transports (tcp, ucx).

Every message starts with a fixed 48-byte little-endian header:

    magic u32 | kind u16 | status u16 | transfer_id u64 | dst_block u64 | num_blocks u64
    | offset u64 | nbytes u64

- DATA: `nbytes` payload bytes follow. They belong at byte `offset` of the destination run
  (dst_block, num_blocks), i.e. at region byte dst_block * block_bytes + offset. A run is
  split into chunks; the receiver counts the union of the byte ranges it received, so a
  chunk sent twice (after a reconnect) is counted once.
- FIN: the sender has sent every chunk of the transfer; `nbytes` is the transfer's total.
  No payload. The receiver answers with ACK once it has processed every earlier frame of
  that connection.
- ACK: the receiver's answer to FIN; `status` says whether all expected bytes arrived and
  `nbytes` how many did.

The header carries no pickled or variable-length data, so a malformed peer can at worst
make the receiver discard bytes or drop the connection.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass

MAGIC = 0x564B534D  # b"MSKV" little-endian
HEADER = struct.Struct("<IHHQQQQQ")
HEADER_SIZE = HEADER.size


class Kind(enum.IntEnum):
    DATA = 1
    FIN = 2
    ACK = 3


class AckStatus(enum.IntEnum):
    COMPLETE = 0  # every expected byte is in the region
    INCOMPLETE = 1  # the transfer is expected but bytes are missing (runs disagree)
    UNKNOWN = 2  # no such transfer: never expected, or already forgotten
    CANCELLED = 3  # the receiver cancelled the transfer (or failed its checksum)


class FrameError(ValueError):
    """A header that is not ours (bad magic or kind) or is inconsistent."""


@dataclass(frozen=True)
class Header:
    kind: Kind
    transfer_id: int
    dst_block: int = 0
    num_blocks: int = 0
    offset: int = 0
    nbytes: int = 0
    status: int = 0

    def pack(self) -> bytes:
        return HEADER.pack(
            MAGIC,
            self.kind,
            self.status,
            self.transfer_id,
            self.dst_block,
            self.num_blocks,
            self.offset,
            self.nbytes,
        )

    def pack_into(self, buffer: bytearray | memoryview) -> None:
        HEADER.pack_into(
            buffer,
            0,
            MAGIC,
            self.kind,
            self.status,
            self.transfer_id,
            self.dst_block,
            self.num_blocks,
            self.offset,
            self.nbytes,
        )

    @classmethod
    def unpack(cls, buffer: bytes | bytearray | memoryview) -> Header:
        if len(buffer) < HEADER_SIZE:
            raise FrameError(f"header of {len(buffer)} bytes, expected {HEADER_SIZE}")
        magic, kind, status, tid, dst, num, offset, nbytes = HEADER.unpack_from(buffer)
        if magic != MAGIC:
            raise FrameError(f"bad magic {magic:#x}")
        try:
            parsed = Kind(kind)
        except ValueError:
            raise FrameError(f"unknown frame kind {kind}") from None
        return cls(parsed, tid, dst, num, offset, nbytes, status)
