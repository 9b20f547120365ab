"""The keyword/regex table behind findings-F1: the default Chinese chest-CT vocabulary.

Kept apart from the extraction rules (`findings.py`) because it is the part users change:
load your own from YAML/JSON (`FindingsTable.from_file`) to score other report styles.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple


class Fact(NamedTuple):
    side: str | None
    lobe: str | None
    segment: str | None
    finding: str
    size_mm: float | None


@dataclass
class FindingsTable:
    """Keyword table. Keys are canonical names, values are surface forms (literal text, or a
    regex when prefixed with ``re:``). Text and forms are NFKC-normalised and lower-cased."""

    sides: dict[str, list[str]] = field(
        default_factory=lambda: {
            "左": ["左肺", "左侧", "左"],
            "右": ["右肺", "右侧", "右"],
            "双": ["双肺", "两肺", "双侧", "两侧", "双"],
        }
    )
    lobes: dict[str, list[str]] = field(
        default_factory=lambda: {
            "上叶": ["上叶", "上肺"],
            "中叶": ["中叶", "中肺"],
            "下叶": ["下叶", "下肺"],
            "舌段": ["舌段", "舌叶"],
        }
    )
    segments: dict[str, list[str]] = field(
        default_factory=lambda: {
            s: [s]
            for s in (
                "尖段",
                "后段",
                "前段",
                "尖后段",
                "外侧段",
                "内侧段",
                "背段",
                "基底段",
                "内基底段",
                "前基底段",
                "外基底段",
                "后基底段",
                "前内基底段",
                "上舌段",
                "下舌段",
            )
        }
    )
    findings: dict[str, list[str]] = field(
        default_factory=lambda: {
            "结节": ["结节", "小结节", "结节影", "结节灶"],
            "磨玻璃结节": ["磨玻璃结节", "磨玻璃密度结节", "磨玻璃样结节", "ggn"],
            "磨玻璃影": ["磨玻璃影", "磨玻璃密度影", "磨玻璃样影", "磨玻璃", "ggo"],
            "肿块": ["肿块", "肿块影", "团块", "团块影", "占位"],
            "实变": ["实变", "实变影"],
            "钙化": ["钙化", "钙化灶", "钙化影"],
            "空洞": ["空洞"],
            "斑片影": ["斑片影", "斑片状影", "斑片"],
            "条索": ["条索", "条索影", "索条", "纤维条索", "纤维灶"],
            "胸腔积液": ["胸腔积液", "胸水"],
            "心包积液": ["心包积液"],
            "气胸": ["气胸"],
            "肺气肿": ["肺气肿", "气肿"],
            "肺大泡": ["肺大泡", "肺大疱", "大泡", "大疱"],
            "肺不张": ["肺不张", "不张"],
            "支气管扩张": ["支气管扩张"],
            "胸膜增厚": ["胸膜增厚"],
            "淋巴结肿大": ["淋巴结肿大", "淋巴结增大", "肿大淋巴结"],
        }
    )
    negations: list[str] = field(
        default_factory=lambda: ["未见", "未发现", "未显示", "未探及", "无", "没有", "排除", "除外", "不伴"]
    )
    size_units: dict[str, float] = field(default_factory=lambda: {"mm": 1.0, "毫米": 1.0, "cm": 10.0, "厘米": 10.0})
    lobe_sides: dict[str, str] = field(default_factory=lambda: {"中叶": "右", "舌段": "左"})
    sentence_breaks: str = "。；;!?！？\n"
    clause_breaks: str = "，,：:"
    match_fields: tuple[str, ...] = ("side", "lobe", "segment", "finding", "size_mm")
    size_tolerance_mm: float = 0.0

    @classmethod
    def from_dict(cls, data: dict) -> FindingsTable:
        """Fields missing from ``data`` keep their defaults; with ``extend_default: true`` the
        given dicts/lists are merged into the default ones instead of replacing them."""
        data = dict(data)
        extend = bool(data.pop("extend_default", False))
        unknown = set(data) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"unknown findings-table keys: {sorted(unknown)}")
        table = cls()
        for key, value in data.items():
            current = getattr(table, key)
            if extend and isinstance(current, dict):
                value = {**current, **value}
            elif extend and isinstance(current, list):
                value = current + [v for v in value if v not in current]
            setattr(table, key, tuple(value) if key == "match_fields" else value)
        bad = set(table.match_fields) - set(Fact._fields)
        if bad:
            raise ValueError(f"match_fields must be among {Fact._fields}, got {sorted(bad)}")
        return table

    @classmethod
    def from_file(cls, path: str | Path) -> FindingsTable:
        """Load a YAML (.yaml/.yml) or JSON table."""
        text = Path(path).read_text(encoding="utf-8")
        if str(path).endswith((".yaml", ".yml")):
            import yaml

            return cls.from_dict(yaml.safe_load(text) or {})
        return cls.from_dict(json.loads(text))

    def to_dict(self) -> dict:
        """Plain dict of the table (``yaml.safe_dump(table.to_dict())`` writes a starting file)."""
        return {**dataclasses.asdict(self), "match_fields": list(self.match_fields)}


def load_findings_table(table: FindingsTable | dict | str | Path | None = None) -> FindingsTable:
    """Accept a table, a dict, a YAML/JSON path, or None (the default Chinese chest-CT table)."""
    if table is None:
        return DEFAULT_TABLE
    if isinstance(table, FindingsTable):
        return table
    return FindingsTable.from_dict(table) if isinstance(table, dict) else FindingsTable.from_file(table)


DEFAULT_TABLE = FindingsTable()
