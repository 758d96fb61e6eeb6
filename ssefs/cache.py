"""Local staging of file data, encrypted at rest: no plaintext ever reaches the disk.

A file being written is staged in an ``EncryptedScratchFile``: an unlinked
temporary file in the cache directory (created 0700) made of fixed-size blocks,
each sealed with AES-256-GCM under a key that exists only in this process's
memory, a fresh random 96-bit nonce per sealing, and the file's random id and
block number as associated data (so blocks cannot be swapped or replayed between
files). One "hot" block per file is kept in memory in plaintext so that
sequential writes seal each block once instead of once per ``write()``. Blocks
never written read as zeros, which gives sparse files for free.

Because the scratch key lives only in memory, staged data does not survive the
process; the persistent, crash-safe write-back cache is built on this format
later. The file size is tracked here; bytes past it are kept zero so that
growing the file later shows zeros, as POSIX requires.
"""

from __future__ import annotations

import os
import secrets
import tempfile
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from .errors import SsefsError

# 1 MiB blocks: large enough that per-block overhead (a nonce, a tag, one
# encryption call) is negligible, small enough that a random 4 KiB write costs
# only one block's decryption and re-encryption.
BLOCK_SIZE = 1024 * 1024
NONCE_BYTES = 12
TAG_BYTES = 16
SLOT_SIZE = NONCE_BYTES + BLOCK_SIZE + TAG_BYTES


class CorruptBlock(SsefsError):
    """A sealed block failed authentication: the scratch file was tampered with or torn."""


class ScratchArea:
    """A 0700 directory that holds encrypted scratch files, and the in-memory key for them."""

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        # mkdir's mode is masked by umask and ignored for an existing directory.
        os.chmod(self.directory, 0o700)
        self._cipher = AESGCM(AESGCM.generate_key(bit_length=256))

    def new_file(self) -> EncryptedScratchFile:
        return EncryptedScratchFile(self.directory, self._cipher)


class EncryptedScratchFile:
    """A sparse, growable byte array stored encrypted in an unlinked temporary file."""

    def __init__(self, directory: Path, cipher: AESGCM) -> None:
        self._file = tempfile.TemporaryFile(dir=directory, prefix="scratch-")
        os.fchmod(self._file.fileno(), 0o600)
        self._cipher = cipher
        self._file_id = secrets.token_bytes(16)
        self.size = 0
        self._sealed: set[int] = set()
        self._hot_index: int | None = None
        self._hot = bytearray()

    # --------------------------------------------------------------- blocks

    def _associated_data(self, index: int) -> bytes:
        return self._file_id + index.to_bytes(8, "big")

    def _seal(self, index: int, plaintext: bytes | bytearray) -> None:
        nonce = secrets.token_bytes(NONCE_BYTES)
        sealed = self._cipher.encrypt(nonce, bytes(plaintext), self._associated_data(index))
        os.pwrite(self._file.fileno(), nonce + sealed, index * SLOT_SIZE)
        self._sealed.add(index)

    def _open(self, index: int) -> bytearray:
        if index not in self._sealed:
            return bytearray(BLOCK_SIZE)
        slot = os.pread(self._file.fileno(), SLOT_SIZE, index * SLOT_SIZE)
        try:
            return bytearray(self._cipher.decrypt(slot[:NONCE_BYTES], slot[NONCE_BYTES:], self._associated_data(index)))
        except InvalidTag:
            raise CorruptBlock(f"staged block {index} failed authentication (local disk tampered or damaged)") from None

    def _block(self, index: int) -> bytearray:
        """Make ``index`` the hot block (sealing the previous one) and return it."""
        if self._hot_index != index:
            if self._hot_index is not None:
                self._seal(self._hot_index, self._hot)
            self._hot = self._open(index)
            self._hot_index = index
        return self._hot

    # --------------------------------------------------------------- file API

    def write(self, offset: int, data: bytes) -> int:
        if not data:
            return 0  # POSIX: a zero-length write leaves the size alone
        view = memoryview(data)
        position = offset
        while view:
            index, within = divmod(position, BLOCK_SIZE)
            count = min(len(view), BLOCK_SIZE - within)
            self._block(index)[within:within + count] = view[:count]
            view = view[count:]
            position += count
        self.size = max(self.size, position)
        return len(data)

    def read(self, offset: int, length: int) -> bytes:
        end = min(offset + length, self.size)
        pieces: list[bytes] = []
        position = offset
        while position < end:
            index, within = divmod(position, BLOCK_SIZE)
            count = min(end - position, BLOCK_SIZE - within)
            if index == self._hot_index:
                pieces.append(bytes(self._hot[within:within + count]))
            elif index not in self._sealed:
                pieces.append(bytes(count))
            else:
                pieces.append(bytes(self._open(index)[within:within + count]))
            position += count
        return b"".join(pieces)

    def truncate(self, size: int) -> None:
        if size < self.size:
            last_index, within = divmod(size, BLOCK_SIZE)
            # Zero the tail of the last kept block so a later extension reads zeros.
            if within and (last_index in self._sealed or last_index == self._hot_index):
                block = self._block(last_index)
                block[within:] = bytes(BLOCK_SIZE - within)
            dropped_from = last_index + 1 if within else last_index
            for index in [i for i in self._sealed if i >= dropped_from]:
                self._sealed.discard(index)
            if self._hot_index is not None and self._hot_index >= dropped_from:
                self._hot_index = None
                self._hot = bytearray()
            os.ftruncate(self._file.fileno(), dropped_from * SLOT_SIZE)
        self.size = size

    def close(self) -> None:
        self._hot = bytearray()
        self._hot_index = None
        self._file.close()
