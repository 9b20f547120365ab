"""Old entry point kept for users of the hand-written scripts; same code as `hf-vlm clean`.

    python scripts/clean_caption_csv.py data/train.csv --drop_missing_paths
    python scripts/clean_caption_csv.py data/train.csv --min_answer_chars 50 --require_keywords "结节|mm|肺叶|段|病灶"

With no INPUT, the CSVs named by ``caption_csv_train`` / ``caption_csv_val`` in
``config/paths.yaml`` are cleaned, as the old script did.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without install

from hf_vlm.commands.clean import main  # noqa: E402


def _inputs_from_paths_yaml() -> list[str]:
    paths_yaml = Path("config/paths.yaml")
    if not paths_yaml.is_file():
        return []
    import yaml

    conf = yaml.safe_load(paths_yaml.read_text(encoding="utf-8")) or {}
    return [str(conf[k]) for k in ("caption_csv_train", "caption_csv_val") if conf.get(k)]


if __name__ == "__main__":
    argv = sys.argv[1:]
    if not [a for a in argv if not a.startswith("-")]:
        found = _inputs_from_paths_yaml()
        if not found:
            sys.exit(
                "usage: clean_caption_csv.py INPUT.csv [options]  (or run where config/paths.yaml names caption_csv_train)"  # noqa: E501
            )
        argv = found + argv
    sys.exit(main(argv))
