"""What a run printed, kept within a cap while it is being read.

The sandboxed code can write gigabytes; the parent keeps the first and the last
characters only (never more than a few times the cap in memory) and counts the rest.
Bytes are decoded as UTF-8 as they arrive; bytes that are not UTF-8, and NUL, are shown
as ``\\xNN`` escapes so the text is safe for a tokenizer and still says what was written.
"""

from __future__ import annotations

import codecs
from collections import deque

_CONTROL = str.maketrans({"\x00": "\\x00"})


class OutputCap:
    """Feed bytes with :meth:`feed`; :meth:`text` is the capped output. ``flood_bytes``: past
    that many bytes in total, :attr:`flooded` turns True (the caller kills the writer)."""

    def __init__(self, max_chars: int, flood_bytes: int):
        self.max_chars = max_chars
        self.flood_bytes = flood_bytes
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="backslashreplace")
        self.head: list[str] = []
        self.head_chars = 0
        self.tail: deque[str] = deque()
        self.tail_chars = 0
        self.total_chars = 0
        self.total_bytes = 0

    @property
    def flooded(self) -> bool:
        return self.total_bytes > self.flood_bytes

    def feed(self, data: bytes, final: bool = False) -> None:
        self.total_bytes += len(data)
        self._add(self.decoder.decode(data, final).translate(_CONTROL))

    def _add(self, text: str) -> None:
        if not text:
            return
        self.total_chars += len(text)
        if self.head_chars < self.max_chars:
            take = text[: self.max_chars - self.head_chars]
            self.head.append(take)
            self.head_chars += len(take)
            text = text[len(take) :]
        if not text:
            return
        self.tail.append(text)
        self.tail_chars += len(text)
        while self.tail_chars - len(self.tail[0]) >= self.max_chars:  # keep at least max_chars of tail
            self.tail_chars -= len(self.tail.popleft())

    def text(self, reserve: int = 0) -> str:
        """The output in at most ``max_chars - reserve`` characters: all of it, or head + marker + tail."""
        self.feed(b"", final=True)
        head = "".join(self.head)
        tail = "".join(self.tail)
        room = max(self.max_chars - reserve, 0)
        if self.total_chars <= room:
            return head + tail
        marker_room = len(f"\n[... {self.total_chars} characters cut ...]\n")
        keep = max(room - marker_room, 2)
        head_keep, tail_keep = keep - keep // 2, keep // 2
        cut = self.total_chars - head_keep - tail_keep
        marker = f"\n[... {cut} characters cut ...]\n"
        return head[:head_keep] + marker + (head + tail)[-tail_keep:]
