#!/usr/bin/env python3
"""Writes the fuzz targets' seeds. virtio_net: a driver that activates the
device properly (features, both queues, DRIVER_OK), posts one RX buffer and
one TX frame carrying a stream record, queues a frame for the guest, and
lets the device visit. virtio_blk: a driver that activates the block device
and asks for a write, a read, a flush and the device id. The fuzzer mutates
from there.

Usage: vmm/fuzz/make-seeds.py   (writes vmm/fuzz/seeds/virtio_*/...)
"""
import os
import struct

STATUS, DRV_FEAT, DRV_FEAT_SEL = 0x070, 0x020, 0x024
QSEL, QNUM, QREADY, NOTIFY = 0x030, 0x038, 0x044, 0x050
QDESC, QDRV, QDEV, INTERRUPT_STATUS = 0x080, 0x090, 0x0A0, 0x060


def mmio_write(offset, value):
    return bytes([0]) + struct.pack("<HI", offset, value)


def mem_write(addr, data):
    return bytes([2]) + struct.pack("<IB", addr, len(data)) + data


seed = mmio_write(STATUS, 1 | 2)
seed += mmio_write(DRV_FEAT_SEL, 1) + mmio_write(DRV_FEAT, 1)  # VIRTIO_F_VERSION_1
seed += mmio_write(STATUS, 1 | 2 | 8)
for queue, base in enumerate([0x1000, 0x8000]):
    for offset, value in [(QSEL, queue), (QNUM, 16), (QDESC, base), (QDRV, base + 0x1000), (QDEV, base + 0x2000), (QREADY, 1)]:
        seed += mmio_write(offset, value)
seed += mmio_write(STATUS, 1 | 2 | 8 | 4)
# TX: one descriptor: virtio-net header, Ethernet header, a Close record.
frame = b"\0" * 12 + b"\x02" * 12 + b"\x88\xb5" + bytes([3]) + struct.pack("<QI", 1, 0)
seed += mem_write(0x10000, frame)
seed += mem_write(0x8000, struct.pack("<QIHH", 0x10000, len(frame), 0, 0))
seed += mem_write(0x9000, struct.pack("<HHH", 0, 1, 0))
# RX: one device-writable descriptor.
seed += mem_write(0x1000, struct.pack("<QIHH", 0x20000, 2048, 2, 0))
seed += mem_write(0x2000, struct.pack("<HHH", 0, 1, 0))
seed += bytes([4, 20]) + b"\x02" * 12 + b"\x88\xb5" + b"\x01" * 6
seed += mmio_write(NOTIFY, 1) + bytes([3]) + bytes([1]) + struct.pack("<H", INTERRUPT_STATUS) + bytes([3])

out = os.path.join(os.path.dirname(os.path.abspath(__file__)), "seeds", "virtio_net", "activate-tx-rx")
with open(out, "wb") as f:
    f.write(seed)
print(f"{out}: {len(seed)} bytes")

# virtio_blk: one queue; requests: write sector 3, read it back, flush, get id.
seed = mmio_write(STATUS, 1 | 2)
seed += mmio_write(DRV_FEAT_SEL, 1) + mmio_write(DRV_FEAT, 1)
seed += mmio_write(STATUS, 1 | 2 | 8)
for offset, value in [(QSEL, 0), (QNUM, 16), (QDESC, 0x1000), (QDRV, 0x2000), (QDEV, 0x3000), (QREADY, 1)]:
    seed += mmio_write(offset, value)
seed += mmio_write(STATUS, 1 | 2 | 8 | 4)
NEXT, WRITE = 1, 2
requests = [(1, 3, 512, False), (0, 3, 512, True), (4, 0, 0, None), (8, 0, 20, True)]
descs = b""
index = 0
heads = []
for n, (kind, sector, length, device_writes) in enumerate(requests):
    header_at, data_at, status_at = 0x10000 + n * 0x1000, 0x10000 + n * 0x1000 + 16, 0x10000 + n * 0x1000 + 0x800
    seed += mem_write(header_at, struct.pack("<IIQ", kind, 0, sector))
    heads.append(index)
    descs += struct.pack("<QIHH", header_at, 16, NEXT, index + 1)
    index += 1
    if length:
        descs += struct.pack("<QIHH", data_at, length, NEXT | (WRITE if device_writes else 0), index + 1)
        index += 1
    descs += struct.pack("<QIHH", status_at, 1, WRITE, 0)
    index += 1
for at in range(0, len(descs), 200):
    seed += mem_write(0x1000 + at, descs[at:at + 200])
seed += mem_write(0x2000, struct.pack("<HH", 0, len(heads)) + b"".join(struct.pack("<H", h) for h in heads))
seed += mmio_write(NOTIFY, 0) + bytes([3])

out = os.path.join(os.path.dirname(os.path.abspath(__file__)), "seeds", "virtio_blk", "write-read-flush-id")
os.makedirs(os.path.dirname(out), exist_ok=True)
with open(out, "wb") as f:
    f.write(seed)
print(f"{out}: {len(seed)} bytes")
