"""Reading safetensors checkpoints for a weight update: regular files only, every read bounded by
the update's deadline, and never in a way that stalls the rest of the process.

Design decisions:
- A path that is not a regular file (a FIFO, a device, a socket) is refused before anything
  reads from it: opening a FIFO blocks until a writer comes, and safetensors' own reader held
  the GIL while it blocked, so the whole replica froze (generation, GetStatus, resets).
  The file is opened with O_NONBLOCK and checked again on the open descriptor (fstat), so a
  file swapped for a FIFO between the two checks is refused too.
- Our own reader, not mmap: the header (8-byte length, then JSON) is read and checked (its size
  before its contents, every tensor's byte range inside the file and matching its dtype and
  shape), then each tensor's bytes are read with `readinto` in chunks (the GIL is released
  while the kernel reads), checking the deadline between chunks.
- The reads run on a worker thread the caller waits for with the time left: a read that hangs in
  the kernel (a stuck network filesystem) costs the caller a TimeoutError naming the file, not
  its thread; the worker stops at its next chunk.
"""

from __future__ import annotations

import json
import math
import os
import stat
import threading
import time
from pathlib import Path

import torch

READ_CHUNK_BYTES = 16 << 20
MAX_HEADER_BYTES = 100 << 20  # safetensors' own limit
# safetensors dtype names -> torch (floating point only: weights are never integers)
SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


class WeightFileError(ValueError):
    """A checkpoint file that cannot be read as a weight update (the message names it)."""


def check_regular_file(path: str | Path) -> None:
    """WeightFileError unless `path` is a regular file (symlinks followed), without opening it."""
    try:
        mode = os.stat(path).st_mode
    except OSError as e:
        raise WeightFileError(f"{path} cannot be read on this replica: {e.strerror}") from None
    if not stat.S_ISREG(mode):
        raise WeightFileError(f"{path} is not a regular file (a FIFO, device or socket is never read)")


def _open(path: Path) -> int:
    check_regular_file(path)
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    if not stat.S_ISREG(os.fstat(fd).st_mode):  # replaced between the check and the open
        os.close(fd)
        raise WeightFileError(f"{path} is not a regular file")
    return fd


def _read_exactly(fd: int, buffer: memoryview, offset: int, deadline: float, stop: threading.Event, path: Path):
    done = 0
    while done < len(buffer):
        if stop.is_set() or time.monotonic() > deadline:
            raise TimeoutError(f"reading {path} passed the update's deadline")
        n = os.preadv(fd, [buffer[done:done + READ_CHUNK_BYTES]], offset + done)
        if n == 0:
            raise WeightFileError(f"{path} ends early (truncated)")
        done += n


def read_header(path: str | Path, deadline: float, stop: threading.Event | None = None) -> dict[str, dict]:
    """The tensor entries of a safetensors file ({name: {dtype, shape, data_offsets}}), checked:
    header size first, then each entry's dtype, shape and byte range against the file size.
    Offsets in the result are absolute (from the start of the file)."""
    path, stop = Path(path), stop or threading.Event()
    fd = _open(path)
    try:
        size = os.fstat(fd).st_size
        head = bytearray(8)
        _read_exactly(fd, memoryview(head), 0, deadline, stop, path)
        length = int.from_bytes(head, "little")
        if length > min(MAX_HEADER_BYTES, size - 8):
            raise WeightFileError(f"{path}: header of {length} bytes does not fit the file ({size} bytes) "
                                  f"or the limit ({MAX_HEADER_BYTES})")
        raw = bytearray(length)
        _read_exactly(fd, memoryview(raw), 8, deadline, stop, path)
    finally:
        os.close(fd)
    try:
        header = json.loads(bytes(raw))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise WeightFileError(f"{path}: the header is not JSON: {e}") from None
    if not isinstance(header, dict):
        raise WeightFileError(f"{path}: the header is not a JSON object")
    entries, start = {}, 8 + length
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (begin, end) = entry["dtype"], [int(d) for d in entry["shape"]], entry["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise WeightFileError(f"{path}: tensor {name!r} has no dtype, shape and data_offsets") from None
        torch_dtype = SAFETENSORS_DTYPES.get(dtype)
        if torch_dtype is None:
            raise WeightFileError(f"{name}: dtype {dtype} is not a floating-point type")
        nbytes = math.prod(shape) * torch_dtype.itemsize
        if not (isinstance(begin, int) and isinstance(end, int) and 0 <= begin and end - begin == nbytes
                and start + end <= size):
            raise WeightFileError(f"{path}: tensor {name!r} byte range {begin}..{end} does not hold "
                                  f"{dtype} {shape} inside the file")
        entries[name] = dict(dtype=torch_dtype, shape=shape, begin=start + begin, nbytes=nbytes)
    return entries


def read_tensors(path: str | Path, entries: dict[str, dict], deadline: float,
                 stop: threading.Event | None = None) -> dict[str, torch.Tensor]:
    """The named tensors (entries from `read_header`) as CPU tensors, every read bounded by `deadline`."""
    path, stop = Path(path), stop or threading.Event()
    fd = _open(path)
    try:
        out = {}
        for name, e in entries.items():
            data = torch.empty(e["nbytes"], dtype=torch.uint8)
            if e["nbytes"]:
                _read_exactly(fd, memoryview(data.numpy()), e["begin"], deadline, stop, path)
            out[name] = data.view(e["dtype"]).reshape(e["shape"])
        return out
    finally:
        os.close(fd)


def off_thread(fn, deadline: float, what: str):
    """fn(stop) on a worker thread; its result, or TimeoutError once `deadline` passes (the worker
    is told to stop at its next chunk). Exceptions of fn are raised here."""
    stop, out = threading.Event(), {}

    def run() -> None:
        try:
            out["result"] = fn(stop)
        except BaseException as e:  # noqa: BLE001 - handed to the caller
            out["error"] = e
    worker = threading.Thread(target=run, name=f"weight-read-{what}", daemon=True)
    worker.start()
    worker.join(max(deadline - time.monotonic(), 0.0))
    if worker.is_alive():
        stop.set()
        raise TimeoutError(f"{what} did not finish before the update's deadline")
    if "error" in out:
        raise out["error"]
    return out["result"]
