"""Tokenisation of Chinese radiology reports for n-gram metrics.

Why this module exists: the usual English tooling silently breaks on Chinese. The
`rouge-score` default tokenizer deletes every CJK character (ROUGE = 0), `str.split()` sees a
whole report as one "word", and sacrebleu needs ``tokenize="zh"``. The literature convention
for Chinese report generation is *character level* BLEU / ROUGE-L / CIDEr, so that is the
default here, and every output states the granularity it was computed at.

Rules of the ``"char"`` granularity (decided once, documented in docs/metrics.md):

1. NFKC normalisation (full-width "１２ｍｍ" -> "12mm", "，" -> ","), ASCII lower-cased ("CT" == "ct").
2. Each CJK character is one token: "右肺下叶" -> 右 肺 下 叶.
3. A run of ASCII letters/digits is ONE token, including decimals and dimension signs:
   "12mm", "1.2cm", "8×6mm", "ct". A size is a unit of meaning; splitting "12mm" into
   1 2 m m would reward a wrong size ("21mm") with partial matches. This also agrees with
   sacrebleu's ``zh`` tokenizer. "8*6mm", "8x6mm", "8 × 6 mm" are normalised to "8×6mm" first.
4. Punctuation (Unicode category P*) is removed by default: "，。；" are frequent, carry no
   clinical content and would inflate BLEU-1/CIDEr with free matches (the COCO PTB
   tokenizer drops punctuation too). Pass ``keep_punct=True`` to keep each mark as a token.
5. Any other visible character (symbols such as "~", "℃", "+") is one token.

``"word"`` granularity segments with jieba (optional dependency, ``pip install jieba``),
after the same normalisation; punctuation tokens are removed the same way.
"""

from __future__ import annotations

import re
import unicodedata

GRANULARITIES = ("char", "word")

# ASCII alnum run, optionally continued by ".5" (decimal) or "×6" (dimensions): 1.2cm, 8×6×5mm.
_ALNUM_RUN = r"[0-9a-z]+(?:[.×][0-9a-z]+)*"
_TOKEN_RE = re.compile(rf"{_ALNUM_RUN}|\S")
_DIM_SIGN_RE = re.compile(r"(?<=\d)\s*[x*×]\s*(?=\d)")
_UNIT_SPACE_RE = re.compile(r"(?<=\d)\s+(?=(?:mm|cm|ml|hu)(?![a-z]))")


def describe_tokenization(granularity: str = "char", keep_punct: bool = False) -> str:
    """One line for tables and JSON outputs, so a score is never quoted without its unit."""
    punct = "punctuation kept" if keep_punct else "punctuation removed"
    if granularity == "char":
        return f'char: each CJK character is a token, ASCII runs like "12mm"/"1.2cm"/"8×6mm" are one token, {punct}, NFKC + lower-case'  # noqa: E501
    if granularity == "word":
        return f"word: jieba segmentation, {punct}, NFKC + lower-case"
    raise ValueError(f"granularity must be one of {GRANULARITIES}, got {granularity!r}")


def normalize(text: str) -> str:
    """NFKC + lower-case + unify sizes ("8*6mm", "8 x 6 mm" -> "8×6mm", "12 mm" -> "12mm")."""
    text = unicodedata.normalize("NFKC", text or "").lower()
    return _UNIT_SPACE_RE.sub("", _DIM_SIGN_RE.sub("×", text))


def _is_punct(token: str) -> bool:
    return len(token) == 1 and unicodedata.category(token).startswith("P")


def tokenize(text: str, granularity: str = "char", keep_punct: bool = False) -> list[str]:
    """Split one report into metric tokens (see the module docstring for the rules)."""
    text = normalize(text)
    if granularity == "char":
        tokens = _TOKEN_RE.findall(text)
    elif granularity == "word":
        tokens = [t for t in _jieba_cut(text) if t.strip()]
    else:
        raise ValueError(f"granularity must be one of {GRANULARITIES}, got {granularity!r}")
    if not keep_punct:
        tokens = [t for t in tokens if not all(_is_punct(c) for c in t)]
    return tokens


def tokenize_joined(text: str, granularity: str = "char", keep_punct: bool = False) -> str:
    """Space-joined tokens: the input format pycocoevalcap and ``sacrebleu(tokenize="none")`` expect."""
    return " ".join(tokenize(text, granularity, keep_punct))


_JIEBA = None


def _jieba_cut(text: str) -> list[str]:
    """Import jieba lazily: it is optional and builds its dictionary (~1 s) on first use."""
    global _JIEBA
    if _JIEBA is None:
        try:
            import jieba
        except ImportError as exc:  # pragma: no cover - depends on the environment
            raise ImportError(
                'granularity="word" needs jieba: pip install jieba (or pip install "hf_vlm[metrics]")'
            ) from exc
        import logging

        jieba.setLogLevel(logging.WARNING)  # silence "Building prefix dict ..." on stderr
        _JIEBA = jieba
    return _JIEBA.lcut(text)
