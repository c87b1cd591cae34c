"""The GPT-2/CLIP byte-to-unicode table shared by the byte-level tokenizers in this package."""

from __future__ import annotations

from functools import cache


@cache
def bytes_to_unicode() -> dict[int, str]:
    """Map every byte 0..255 to a printable unicode character (the GPT-2/CLIP convention).

    Byte-level BPE vocabularies (CLIP's ``bpe_simple_vocab_16e6``, GPT-2's ``vocab.json``) are
    written in this alphabet rather than in raw bytes, so whitespace and control bytes stay
    visible and never collide with the separators of ``merges.txt``.
    """
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    n = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + n)
            n += 1
    return dict(zip(printable, map(chr, chars), strict=True))
