"""``python -m gateway_tests.bench.bomb`` — how long a gzip bomb within the limits costs a restore.

The bomb is what issue 11 describes: a small object whose entries are each within the bounds
but that together expand past ``CXG_RESTORE_MAX_BYTES`` (default 8 GiB): ``--files`` files of
``--file-gib`` GiB of zeros. It is restored twice through ``Persistence`` over the local store,
as a first connect and a reconnect would; each attempt prints the time until the refusal and
the bytes the process wrote meanwhile (``wchar`` of ``/proc/self/io``).
"""

from __future__ import annotations

import argparse
import tarfile
import tempfile
import time
import zlib
from pathlib import Path

import trio

from gateway.codex_home.persistence import HostileArchive, Persistence
from gateway.config import RestoreLimits
from gateway.store.base import archive_key
from gateway.store.local import LocalDirectoryStore

GIB = 1 << 30
WORKSPACE = "ws-bomb"


def write_bomb(path: Path, files: int, file_bytes: int) -> int:
    """Write the bomb to ``path`` without holding it in memory; return its size."""
    compressor = zlib.compressobj(9, zlib.DEFLATED, 31)
    zeros = bytes(1 << 20)
    with open(path, "wb") as out:
        for index in range(files):
            info = tarfile.TarInfo(f"zeros{index}")
            info.size = file_bytes
            out.write(compressor.compress(info.tobuf(tarfile.PAX_FORMAT)))
            for _ in range(file_bytes // len(zeros)):
                out.write(compressor.compress(zeros))
        out.write(compressor.compress(bytes(2 * tarfile.BLOCKSIZE)))
        out.write(compressor.flush())
    return path.stat().st_size


def written_bytes() -> int:
    """Bytes this process has written so far (``wchar``)."""
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("wchar:"):
            return int(line.split()[1])
    raise RuntimeError("no wchar in /proc/self/io")


async def restore_once(persistence: Persistence, target: Path) -> tuple[float, int, str]:
    """One restore attempt: seconds to the refusal, bytes written, the refusal."""
    before, started = written_bytes(), time.monotonic()
    try:
        await persistence.restore(WORKSPACE, target)
    except HostileArchive as exc:
        return time.monotonic() - started, written_bytes() - before, str(exc)
    raise AssertionError("the bomb was restored")


async def main(files: int, file_gib: float, max_gib: float, max_ratio: int) -> None:
    """Build the bomb, then time a first restore and a reconnect's restore."""
    with tempfile.TemporaryDirectory(dir=Path.cwd()) as tmp:
        root = Path(tmp)
        store_dir = root / "store"
        key_path = store_dir / archive_key(WORKSPACE)
        key_path.parent.mkdir(parents=True)
        size = write_bomb(key_path, files, int(file_gib * GIB))
        print(f"bomb: {files} x {file_gib} GiB of zeros, stored as {size / (1 << 20):.1f} MiB")
        limits = RestoreLimits(
            max_total_bytes=int(max_gib * GIB), max_entries=200_000, max_ratio=max_ratio
        )
        persistence = Persistence(LocalDirectoryStore(store_dir), limits)
        for attempt in ("first connect", "reconnect"):
            seconds, written, reason = await restore_once(persistence, root / attempt / "home")
            print(f"{attempt}: refused after {seconds:.2f} s, {written / GIB:.3f} GiB written")
            print(f"  {reason}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m gateway_tests.bench.bomb")
    parser.add_argument("--files", type=int, default=9)
    parser.add_argument("--file-gib", type=float, default=1.0)
    parser.add_argument("--max-gib", type=float, default=8.0, help="CXG_RESTORE_MAX_BYTES")
    parser.add_argument("--max-ratio", type=int, default=100, help="CXG_RESTORE_MAX_RATIO")
    args = parser.parse_args()
    trio.run(main, args.files, args.file_gib, args.max_gib, args.max_ratio)
