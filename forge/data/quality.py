"""The document quality score (A2 data quality): a number in [0, 1], higher is better.

The spec keeps a document when quality_score(text) > data.filters.quality_score (0.7 in the design).

    score = min(compressibility, cleanliness)

compressibility catches repetition: r = zlib-compressed size / UTF-8 size. Prose and code compress to
    r >= 0.175 (measured over every document of the four shared sources, the standard library and the
    pydoc topics; medians 0.31-0.68), while boilerplate repeated over and over compresses far better
    (one paragraph ten times: r ~ 0.05). Mapped linearly, r <= 0.05 -> 0 and r >= 0.20 -> 1, so at
    the 0.7 threshold a document passes when r > 0.155.
cleanliness catches binary and mis-decoded text: with s the share of characters that are not text
    (control characters other than tab/newline/CR/VT/FF, U+FFFD decoding errors, private-use code
    points, lone surrogates), cleanliness = 1 - s / 0.10, clipped to [0, 1]. Real text has s = 0 (no
    such character in any shared document, the standard library or the pydoc topics); a binary file
    read as Latin-1 has s ~ 0.23. At the 0.7 threshold a document fails when s > 3%.

Short documents cannot be judged for repetition (zlib's overhead dominates) and score high; the
min_length filter is what removes them.
"""
from __future__ import annotations

import re
import zlib

RATIO_ZERO = 0.05   # compressed/raw at or below this: pure repetition, score 0
RATIO_ONE = 0.20    # at or above this: no excess repetition, score 1
NOISE_ZERO = 0.10   # share of non-text characters at which cleanliness reaches 0
_NOT_TEXT = re.compile("[\x00-\x08\x0e-\x1f\x7f-\x9f\ufffd\ue000-\uf8ff\ud800-\udfff]")


def compressibility(text: str) -> float:
    raw = text.encode("utf-8", errors="surrogatepass")
    if not raw:
        return 0.0
    ratio = len(zlib.compress(raw, 6)) / len(raw)
    return min(1.0, max(0.0, (ratio - RATIO_ZERO) / (RATIO_ONE - RATIO_ZERO)))


def cleanliness(text: str) -> float:
    if not text:
        return 0.0
    noise = len(_NOT_TEXT.findall(text)) / len(text)
    return max(0.0, 1.0 - noise / NOISE_ZERO)


def quality_score(text: str) -> float:
    """min(compressibility, cleanliness), in [0, 1]; see the module docstring."""
    return min(compressibility(text), cleanliness(text))
