"""Findings-level scoring: did the report state the right facts, not just the right characters?

Why: BLEU/ROUGE/CIDEr reward a fluent template ("右肺上叶见一结节，约8mm…") even when the lobe,
side or size is wrong, which is exactly the error that matters clinically. This module
extracts, per report, the set of facts ``(side, lobe, segment, finding, size_mm)`` with a
keyword/regex table, and compares prediction and reference sets (precision/recall/F1, micro
and macro). It is a transparent rule-based check, not a clinical NLP system: adapt the
table to your reports (see docs/metrics.md).

Rules, per sentence (split on 。；;!?\\n, clauses on ，,：:):
- a finding takes the side/lobe/segment mentions since the previous finding; if there are
  none it inherits the previous finding's locations ("右肺上叶见结节及钙化"), else takes the
  locations right after it in the same clause ("结节位于右肺上叶");
- "右肺上叶、中叶" gives two locations; a lobe implied by ``lobe_sides`` fills a missing side;
- a finding preceded by a negation cue in the same clause ("未见结节") yields no fact;
- a size ("约8mm", "1.2cm"->12, "8×6mm"->8, max dimension) goes to the nearest finding in its
  clause, else the previous finding in the sentence, else the next one.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence
from itertools import accumulate
from pathlib import Path

from .findings_table import DEFAULT_TABLE, Fact, FindingsTable, load_findings_table
from .tokenize import normalize

_NUM = r"\d+(?:\.\d+)?"


class _Compiled:
    """Regexes built once per table: one alternation of every term, longest form first."""

    def __init__(self, table: FindingsTable):
        self.table = table
        forms, self.meta = [], {}
        for category in ("sides", "lobes", "segments", "findings"):
            for canon, aliases in getattr(table, category).items():
                forms += [(a, category, canon) for a in aliases]
        forms += [(a, "negations", None) for a in table.negations]
        forms.sort(key=lambda f: -len(f[0]))
        parts = []
        for i, (form, category, canon) in enumerate(forms):
            pattern = form[3:] if form.startswith("re:") else re.escape(normalize(form))
            parts.append(f"(?P<t{i}>{pattern})")
            self.meta[f"t{i}"] = (category, canon)
        self.terms = re.compile("|".join(parts)) if parts else None
        units = sorted((normalize(u) for u in table.size_units), key=len, reverse=True)
        self.unit_factor = {normalize(u): f for u, f in table.size_units.items()}
        unit = "(?:" + "|".join(map(re.escape, units)) + ")"
        self.size_part = re.compile(rf"({_NUM})\s*({unit})?")
        self.size = re.compile(rf"{_NUM}\s*{unit}?(?:\s*[×~\-至到]\s*{_NUM}\s*{unit}?)*")
        self.sentences = re.compile("[" + re.escape(table.sentence_breaks) + "]")

    def size_mm(self, text: str) -> float | None:
        """ "8×6mm" -> 8.0, "1.2cm" -> 12.0; None without any unit ("第3肋", "2个")."""
        parts = self.size_part.findall(text)
        values, unit = [], None
        for number, part_unit in reversed(parts):  # a trailing unit applies to bare numbers before it
            unit = part_unit or unit
            if unit is not None:
                values.append(float(number) * self.unit_factor[unit])
        return round(max(values), 1) if values else None


def _compiled(table: FindingsTable) -> _Compiled:
    """Compile once per table, recompiling if the table was edited since."""
    key = repr(dataclasses.astuple(table))
    cached = table.__dict__.get("_compiled")
    if cached is None or cached[0] != key:
        cached = table.__dict__["_compiled"] = (key, _Compiled(table))
    return cached[1]


def _locations(mentions: list[tuple[int, int, str, str]], lobe_sides: dict[str, str]) -> list[tuple]:
    """Turn consecutive side/lobe/segment mentions into (side, lobe, segment) groups."""
    groups: list[list] = []
    side, last_end = None, None
    for start, end, category, canon in mentions:
        last = groups[-1] if groups else None
        if category == "sides":
            side = canon
            groups.append([side, None, None])
        elif category == "lobes":
            if last and last[2] is None and (last[1] is None or start == last_end):
                last[1] = canon  # fills "右肺" + "上叶", or refines "上叶舌段"
            else:
                groups.append([side, canon, None])
        elif last and last[2] is None:
            last[2] = canon
        else:
            groups.append([last[0] if last else side, last[1] if last else None, canon])
        last_end = end
    out = []
    for s, lobe, seg in groups:
        group = (s or lobe_sides.get(lobe), lobe, seg)
        if group not in out:
            out.append(group)
    return out


def _sentence_facts(sentence: str, c: _Compiled) -> set[Fact]:
    table = c.table
    mentions = [(m.start(), m.end(), *c.meta[m.lastgroup]) for m in c.terms.finditer(sentence)] if c.terms else []
    clause = list(accumulate((ch in table.clause_breaks for ch in sentence), initial=0))
    findings = [m for m in mentions if m[2] == "findings"]
    locs = [m for m in mentions if m[2] in ("sides", "lobes", "segments")]
    cues = [m for m in mentions if m[2] == "negations"]
    used, prev, places = set(), [], []
    for i, (start, end, _, _) in enumerate(findings):
        before = [j for j, m in enumerate(locs) if j not in used and m[0] < start]
        used.update(before)
        groups = _locations([locs[j] for j in before], table.lobe_sides) or prev
        if not groups:  # "结节位于右肺上叶": look ahead within the clause, up to the next finding
            stop = findings[i + 1][0] if i + 1 < len(findings) else len(sentence)
            after = [
                j for j, m in enumerate(locs) if j not in used and end <= m[0] < stop and clause[m[0]] == clause[start]
            ]
            used.update(after)
            groups = _locations([locs[j] for j in after], table.lobe_sides)
        places.append(groups)
        prev = groups
    sizes: dict[int, list[float]] = {}
    for m in c.size.finditer(sentence):
        mm = c.size_mm(m.group())
        if mm is None or not findings:
            continue
        dist = [m.start() - f[1] if m.start() >= f[1] else f[0] - m.end() for f in findings]
        same = [i for i, f in enumerate(findings) if clause[f[0]] == clause[m.start()]]
        earlier = [i for i, f in enumerate(findings) if f[1] <= m.start()]
        target = min(same, key=dist.__getitem__) if same else (earlier[-1] if earlier else 0)
        sizes.setdefault(target, []).append(mm)
    facts = set()
    for i, (start, _, _, canon) in enumerate(findings):
        if any(cue[0] < start and clause[cue[0]] == clause[start] for cue in cues):
            continue  # "未见结节": a negated finding is not a fact
        size = max(sizes[i]) if i in sizes else None
        for side, lobe, segment in places[i] or [(None, None, None)]:
            facts.add(Fact(side, lobe, segment, canon, size))
    return facts


def extract_facts(report: str, table: FindingsTable | dict | str | Path | None = None) -> set[Fact]:
    """All non-negated facts of one report, e.g. {Fact("右", "下叶", None, "结节", 12.0)}."""
    c = _compiled(load_findings_table(table))
    facts: set[Fact] = set()
    for sentence in c.sentences.split(normalize(report)):
        facts |= _sentence_facts(sentence, c)
    return facts


def match_count(pred: set[Fact], ref: set[Fact], table: FindingsTable | None = None) -> int:
    """One-to-one matches between two fact sets on ``table.match_fields``; sizes match when
    both are None or differ by at most ``size_tolerance_mm``."""
    table = table or DEFAULT_TABLE
    fields = [f for f in table.match_fields if f != "size_mm"]
    use_size = "size_mm" in table.match_fields

    def size_ok(a: float | None, b: float | None) -> bool:
        if not use_size or (a is None and b is None):
            return True
        return a is not None and b is not None and abs(a - b) <= table.size_tolerance_mm + 1e-9

    free = [(tuple(getattr(r, f) for f in fields), r.size_mm) for r in ref]
    hits = 0
    for p in sorted(pred, key=repr):  # greedy, in a fixed order so results are reproducible
        key = tuple(getattr(p, f) for f in fields)
        j = next((j for j, (r_key, r_size) in enumerate(free) if r_key == key and size_ok(p.size_mm, r_size)), None)
        if j is not None:
            hits += 1
            del free[j]
    return hits


def _prf(hits: int, n_pred: int, n_ref: int) -> tuple[float, float, float]:
    """Empty-set rule: both sets empty -> 1, 1, 1 (a normal report correctly left normal);
    one empty -> 0 for the undefined ratio, so a silent model never gets precision 1."""
    if n_pred == 0 and n_ref == 0:
        return 1.0, 1.0, 1.0
    p = hits / n_pred if n_pred else 0.0
    r = hits / n_ref if n_ref else 0.0
    return p, r, (2 * p * r / (p + r) if p + r else 0.0)


def findings_scores(
    predictions: Sequence[str],
    references: Sequence[str] | Sequence[Sequence[str]],
    table: FindingsTable | dict | str | Path | None = None,
) -> dict:
    """Micro (pooled counts) and macro (mean over reports) precision/recall/F1 of facts.

    With several references for a report, the reference giving the best F1 is used.
    Keys: findings_precision/recall/f1 (micro), findings_macro_precision/recall/f1,
    findings_n_pred, findings_n_ref, findings_n_match.
    """
    table = load_findings_table(table)
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} references")
    hits_total = pred_total = ref_total = 0
    macro = [0.0, 0.0, 0.0]
    for pred, refs in zip(predictions, references):
        refs = [refs] if isinstance(refs, str) else list(refs)
        p_facts = extract_facts(pred, table)
        best = None
        for ref in refs:
            r_facts = extract_facts(ref, table)
            hits = match_count(p_facts, r_facts, table)
            prf = _prf(hits, len(p_facts), len(r_facts))
            if best is None or prf[2] > best[0][2]:
                best = (prf, hits, len(r_facts))
        prf, hits, n_ref = best
        hits_total, pred_total, ref_total = hits_total + hits, pred_total + len(p_facts), ref_total + n_ref
        macro = [m + x for m, x in zip(macro, prf)]
    n = max(len(predictions), 1)
    p, r, f1 = _prf(hits_total, pred_total, ref_total)
    return {
        "findings_precision": p,
        "findings_recall": r,
        "findings_f1": f1,
        "findings_macro_precision": macro[0] / n,
        "findings_macro_recall": macro[1] / n,
        "findings_macro_f1": macro[2] / n,
        "findings_n_pred": pred_total,
        "findings_n_ref": ref_total,
        "findings_n_match": hits_total,
    }
