"""Per-row text transforms and predicates for Chinese radiology captions.

Every function here is pure and top-level (no closures, no globals mutated), so the cleaning
pipeline can hand them to ``datasets.map/filter`` with ``num_proc > 1`` under Windows' *spawn*
start method. The regular expressions are module constants compiled once per process.

Strip vs reject (why): training on boilerplate teaches the model to *say* boilerplate ("客服电话…"),
so any clause that carries a URL, e-mail, phone number or customer-service keyword is removed
from an otherwise good report (``strip_garbage``); if nothing report-like remains the row is
rejected (``boilerplate_only``). A phrase repeated 3+ times in a row is collapsed to one copy;
if the loop makes up most of the text the row is rejected (``repeated_phrases``). Mojibake is
repaired when a candidate decoding reads as plausible Chinese, else rejected
(``mojibake_unrepairable``): a half-repaired report would teach the model garbage characters.
``detect_encoding`` picks the file-level encoding (utf-8 / utf-8-sig / gbk / gb18030 / utf-16).
"""

from __future__ import annotations

import codecs
import re
import unicodedata
from pathlib import Path

import ftfy

CJK = "\u4e00-\u9fff\u3400-\u4dbf"
_CJK_RE = re.compile(f"[{CJK}]")
_CJK_PUNCT = "，。；：！？（）、“”‘’《》【】…—"
_PUNCT_FULL = {",": "，", ";": "；", ":": "：", "!": "！", "?": "？", "(": "（", ")": "）"}
# Characters that Chinese text only contains after a wrong code page (latin-1 / cp1252 view of
# UTF-8 or GBK bytes). Legitimate report symbols (× ° ± µ · ² ³) are excluded.
_MOJIBAKE_MARKERS = re.compile(
    "[\u0080-\u00af\u00b4\u00b6\u00b8-\u00d6\u00d8-\u00f6\u00f8-\u00ff\u0152\u0153\u0160\u0161"
    "\u0178\u017d\u017e\u0192\u02c6\u02dc\u2020\u2021\u2030\u2039\u203a\u20ac\u2122]"
)
# GB2312 level 1: the 3,755 most frequent hanzi, ~98 % of report text. UTF-8 bytes read as GBK
# land almost entirely outside it, which is what makes GBK-style mojibake detectable.
_COMMON_HANZI = frozenset(
    bytes([hi, lo]).decode("gb2312", "ignore") for hi in range(0xB0, 0xD8) for lo in range(0xA1, 0xFF)
) - {""}
_COMMON_HANZI_RE = re.compile("[" + "".join(sorted(_COMMON_HANZI)) + "]")
_LATIN_LETTER = re.compile("[A-Za-z]")
_NOT_ALNUM = re.compile(r"[\W_]+")
_LOST_BYTES = re.compile("\ufffd|锟斤拷|烫烫烫|屯屯屯")
_CONTROL = re.compile(
    "[\u0000-\u0008\u000b\u000c\u000e-\u001f\u007f\u200b-\u200f\u2028\u2029\u202a-\u202e\u2060\ufeff]"
)
_NEWLINE_AFTER_CJK = re.compile(f"(?<=[{CJK}a-zA-Z0-9])[ \t]*[\r\n]+\\s*(?=\\S)")
_SPACES = re.compile(r"\s+")
_SPACE_NEAR_CJK = re.compile(f"(?<=[{CJK}{_CJK_PUNCT}]) | (?=[{CJK}{_CJK_PUNCT}])")
_HALF_PUNCT = re.compile(r"(?<!\d)[,;:!?](?!//)|[,;:!?](?![\d/])|[()]")  # not 1,000 10:30 http://
_PERIOD = re.compile(f"(?<=[{CJK}）])\\.(?![0-9A-Za-z])|(?<![0-9.])\\.(?=[{CJK}])")  # not 3.5 / "1.右肺"
_PUNCT_RUNS = re.compile("([，。；：、！？])[，。；：、！？]+")
_LEADING_PUNCT = re.compile("^[，。；：、！？\\s]+")
_SENTENCES = re.compile("(?<=[。！？；\n])")
_CLAUSES = re.compile("(?<=[，、])")

URL_RE = re.compile(
    r"(?:https?://|ftp://|www\.)\S+|\b[\w-]+(?:\.[\w-]+)*\.(?:com|cn|net|org|cc|top|vip|xyz|info|io)\b(?:/\S*)?",
    re.I | re.A,
)
EMAIL_RE = re.compile(r"[\w.+-]+@[\w-]+(?:\.[\w-]+)+", re.A)
PHONE_RE = re.compile(
    r"(?<![\d.])(?:(?:\+?86[-\s]?)?1[3-9]\d{9}|[48]00[-\s]?\d{3}[-\s]?\d{4}|0\d{2,3}[-\s]?\d{7,8})(?![\d.])"
)
BOILERPLATE_RE = re.compile(
    r"客服|电话|咨询|热线|微信|扫码|扫一扫|二维码|公众号|官网|网址|下载|客户端|联系我们|投诉|"
    r"加群|(?<![a-z])(?:qq|vx|app)(?![a-z])|版权所有|免责声明|广告|点击链接|关注我们|关注公众号",
    re.I,
)
# Loops: a phrase of 2-16 characters, or 1-3 whole clauses ending in punctuation (any length,
# tried only at clause starts, which keeps the scan cheap), repeated 3+ times in a row.
_REPEAT = re.compile(r"(.{2,16}?)\1{2,}", re.S)
_CLAUSE_REPEAT = re.compile(r"(?:^|(?<=[，。；！？、]))((?:[^，。；！？、]+[，。；！？、]){1,3}?)\1{2,}")
_PLACEHOLDERS = {"", "nan", "none", "null", "n/a", "na", "-", "--", "/", "无", "空", "?", "？"}
REPORT_HINT_RE = re.compile(
    r"肺|叶|段|气管|纵隔|胸|心|肝|胆|胰|脾|肾|膀胱|子宫|附件|前列腺|肠|胃|食管|脑|颅|脊|椎|骨|关节|甲状腺|乳|"
    r"淋巴|血管|动脉|静脉|结节|肿块|病灶|病变|密度|信号|强化|影|灶|囊|钙化|积液|异常|正常|未见|扫描|平扫|增强|"
    r"(?<![a-z])(?:ct|mri?|hu)(?![a-z])|\dmm|\dcm",
    re.I,
)
NORMAL_RE = re.compile(r"无异常|未见异常|未见明显异常|未见明确异常|未见明显病变|未见异常征象|无明显异常|未见病灶|正常")
_NEGATED = re.compile(r"(?:未见|未发现|无|没有|未示)[^，,。；;]*")
_FINDING = re.compile(
    r"结节|肿块|占位|病灶|钙化|积液|增厚|实变|渗出|磨玻璃|斑片|索条|条索|囊|空洞|气肿|大疱|扩张|骨折|"
    r"肿大|增大|增粗|狭窄|不张|转移|炎|癌|瘤|\d|mm|cm",
    re.I,
)


def is_placeholder(text: str | None) -> bool:
    """True for empty cells and the placeholders spreadsheets leave behind ("nan", "-", "无")."""
    return text is None or text.strip().lower() in _PLACEHOLDERS


def _lossy_badness(text: str) -> float:
    """How much of ``text`` looks like wrong-code-page output (lower is better)."""
    hanzi = len(_CJK_RE.findall(text))
    rare = hanzi - len(_COMMON_HANZI_RE.findall(text))
    return 3 * len(_LOST_BYTES.findall(text)) + len(_MOJIBAKE_MARKERS.findall(text)) + (rare if hanzi >= 4 else 0)


def _recode(text: str, encode_as: str, decode_as: str) -> str | None:
    try:
        return text.encode(encode_as).decode(decode_as)
    except (UnicodeEncodeError, UnicodeDecodeError):
        return None


def looks_like_mojibake(text: str) -> bool:
    """Heuristic used after repair: lost bytes, latin-1 debris, or mostly rare hanzi."""
    if _LOST_BYTES.search(text):
        return True
    markers = len(_MOJIBAKE_MARKERS.findall(text))
    if markers >= 3 and markers >= 0.05 * len(text.strip()):
        return True
    hanzi = len(_CJK_RE.findall(text))
    return hanzi >= 4 and len(_COMMON_HANZI_RE.findall(text)) < 0.7 * hanzi


def repair_mojibake(text: str) -> tuple[str, str]:
    """Return ``(text, status)`` with status ``"ok"``, ``"repaired"`` or ``"unrepairable"``.

    Candidates: ftfy (UTF-8 read as latin-1/cp1252, including the sloppy cp1252 variants Windows
    tools produce), UTF-8 read as GBK (``text.encode("gbk").decode("utf-8")``) and GBK read as
    latin-1/cp1252. The candidate with the fewest mojibake signs wins; a text that still looks
    wrong, or that lost bytes (U+FFFD, "锟斤拷"), is unrepairable.
    """
    if text.isascii() or not looks_like_mojibake(text) and not _MOJIBAKE_MARKERS.search(text):
        return text, "ok"
    candidates = [
        text,
        ftfy.fix_encoding(text),
        _recode(text, "gbk", "utf-8"),
        _recode(text, "latin-1", "gb18030"),
        _recode(text, "cp1252", "gb18030"),
    ]
    best = min((c for c in candidates if c), key=_lossy_badness)  # min() keeps the first on ties
    if looks_like_mojibake(best):
        return text, "unrepairable"
    return best, ("ok" if best == text else "repaired")


def normalize_text(text: str) -> str:
    """NFKC + whitespace + punctuation normalisation.

    NFKC folds full-width digits/letters and "㎜" to ASCII, but also turns "，；：" into ASCII; in a
    text with hanzi those are turned back into Chinese punctuation (except between digits,
    "1,000" / "10:30"), and a "." after a hanzi becomes "。" ("3.5mm" is untouched). A line
    break after text becomes "。" so sections do not run together; spaces next to hanzi go.
    """
    text = _CONTROL.sub("", unicodedata.normalize("NFKC", text))
    if _CJK_RE.search(text):
        text = _NEWLINE_AFTER_CJK.sub("。", text)
        text = _SPACES.sub(" ", text).strip()
        text = _HALF_PUNCT.sub(lambda m: _PUNCT_FULL[m.group()], text)
        text = _PERIOD.sub("。", text)
        text = _SPACE_NEAR_CJK.sub("", text)
        text = _PUNCT_RUNS.sub(lambda m: "。" if "。" in m.group() else m.group(1), text)
        return _LEADING_PUNCT.sub("", text)
    return _SPACES.sub(" ", text).strip()


def _is_garbage(clause: str) -> bool:
    return bool(
        URL_RE.search(clause) or EMAIL_RE.search(clause) or PHONE_RE.search(clause) or BOILERPLATE_RE.search(clause)
    )


def strip_garbage(text: str) -> str:
    """Remove every clause (split at ，、 inside sentences split at 。！？；) holding a URL, e-mail,
    phone number or customer-service keyword. Clause granularity keeps "双肺未见异常" from
    "双肺未见异常，如有疑问请拨打客服电话400-800-1234。"."""
    if not _is_garbage(text):
        return text
    kept = []
    for sentence in _SENTENCES.split(text):
        if not _is_garbage(sentence):
            kept.append(sentence)
            continue
        end = sentence[-1] if sentence and sentence[-1] in "。！？；" else ""
        clauses = [c for c in _CLAUSES.split(sentence.rstrip("。！？；")) if c and not _is_garbage(c)]
        if clauses:
            kept.append("".join(clauses).rstrip("，、") + (end or "。"))
    return _LEADING_PUNCT.sub("", "".join(kept)).strip()


def collapse_repeats(text: str) -> tuple[str, float]:
    """Collapse a phrase repeated 3+ times in a row ("左肺上叶左肺上叶左肺上叶" -> "左肺上叶").

    Returns the new text and the fraction of the original characters that were loop copies, so
    the caller can reject rows that are mostly a loop. Units are 2-16 characters or 1-3
    whole clauses, and must contain a non-digit (numbers like "0.000" are not loops)."""
    removed = 0

    def _one(m: re.Match) -> str:
        nonlocal removed
        unit = m.group(1)
        if unit.strip("0123456789.,") == "" or not unit.strip():
            return m.group()
        removed += len(m.group()) - len(unit)
        return unit

    new = _REPEAT.sub(_one, _CLAUSE_REPEAT.sub(_one, text))
    return new, removed / max(1, len(text))


def looks_like_report(text: str) -> bool:
    """True when the text names anatomy, a finding or imaging vocabulary. Used to tell a report
    from what is left of an advert ("获取报告！") or from unrelated text ("今天天气很好")."""
    return bool(REPORT_HINT_RE.search(text))


def cjk_fraction(text: str) -> float:
    """Hanzi / (hanzi + ASCII letters); 0.0 for text without either."""
    hanzi = len(_CJK_RE.findall(text))
    letters = len(_LATIN_LETTER.findall(text))
    return hanzi / (hanzi + letters) if hanzi + letters else 0.0


def is_normal_report(text: str, max_chars: int = 40) -> bool:
    """A short "no abnormality" report: names normality (无异常/未见明显异常/正常…) and, once negated
    clauses (未见…/无…) are removed, mentions no finding, digit or unit."""
    if len(text) > max_chars or not NORMAL_RE.search(text):
        return False
    return not _FINDING.search(_NEGATED.sub("", text))


def dedup_key(text: str) -> str:
    """Text with punctuation, whitespace and case removed: equal keys = near-duplicates."""
    return _NOT_ALNUM.sub("", text.lower())


def detect_encoding(path: Path) -> tuple[str, str]:
    """``(encoding, errors)``: a BOM wins; else the first of utf-8, gbk, gb18030 that decodes
    the whole file. A mixed file (e.g. GBK rows pasted into a UTF-8 file) is read with
    ``errors="replace"`` in utf-8 if most non-ASCII lines are valid UTF-8 (GBK decodes almost
    any bytes, UTF-8 does not), else in gb18030; the broken rows are then rejected as
    ``mojibake_unrepairable`` instead of aborting the load."""
    with open(path, "rb") as f:
        head = f.read(4)
    if head.startswith(codecs.BOM_UTF8):
        return "utf-8-sig", "strict"
    if head[:2] in (codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE):
        return "utf-16", "strict"
    for enc in ("utf-8", "gbk", "gb18030"):
        try:
            dec = codecs.getincrementaldecoder(enc)()
            with open(path, "rb") as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    dec.decode(chunk)
            dec.decode(b"", final=True)
            return enc, "strict"
        except UnicodeDecodeError:
            continue
    utf8_lines = other_lines = 0
    with open(path, "rb") as f:
        for line in f:
            if not line.isascii():
                try:
                    line.decode("utf-8")
                    utf8_lines += 1
                except UnicodeDecodeError:
                    other_lines += 1
    return ("utf-8" if utf8_lines >= other_lines else "gb18030"), "replace"
