"""Recipe YAML + command-line overrides -> the argument dataclasses of `hf-vlm train`.

alignment-handbook style: a recipe is one flat YAML mapping (grouped by comments only), and
any key can be overridden on the command line (`--max_steps 3`) or, in-process, with a dict.
Every key must belong to one of the dataclasses: a typo such as `lerning_rate` fails at once
with the valid keys listed, instead of being silently ignored for a 20-hour run.

Strings are coerced with the same type functions `HfArgumentParser` uses for the command line,
because PyYAML reads `2e-5` (no dot) as a *string*, which TrainingArguments would choke on later.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import os
from dataclasses import dataclass, field
from pathlib import Path

RECIPE_SUFFIXES = (".yaml", ".yml")


@dataclass
class SyntheticDataArguments:
    """The embedded default: synthetic CT data, a local tokenizer and tiny pretrained parts.

    Lives beside `DataArguments` because it is only meaningful for `tiny_preset` runs (demo,
    tests, CI): it lets `recipes/tiny_demo.yaml` run with no network and no data on disk.
    """

    synthetic_data: bool = field(
        default=False,
        metadata={
            "help": "Generate synthetic CT slices + Chinese reports, a tokenizer and tiny pretrained "
            "parts (needs tiny_preset); they fill train_file/eval_file and the model paths."
        },
    )
    synthetic_train_rows: int = field(default=800, metadata={"help": "Synthetic training studies."})
    synthetic_eval_rows: int = field(default=100, metadata={"help": "Synthetic held-out studies."})
    synthetic_lm_steps: int = field(
        default=150, metadata={"help": "'Stage 0' text-only pretraining steps of the tiny Mamba LM."}
    )
    synthetic_studies: bool = field(
        default=False,
        metadata={
            "help": "Synthetic CT studies (NIfTI volumes, nodule rarely on the middle slice) instead of "
            "2-D slices; use with studies: true (recipes/tiny_demo_3d.yaml)."
        },
    )
    synthetic_tower_steps: int = field(
        default=0,
        metadata={
            "help": "'Stage 0' for the tiny vision tower (synthetic_studies only): steps of marking nodule "
            "patches on synthetic slices (hf_vlm.synthetic_tower), standing in for a pretrained CT encoder. "
            "0 keeps the random tower."
        },
    )
    synthetic_dir: str | None = field(
        default=None,
        metadata={"help": "Where the synthetic assets go (default <output_dir>/assets); reused if present."},
    )

    def __post_init__(self):
        if min(self.synthetic_eval_rows, self.synthetic_lm_steps, self.synthetic_tower_steps) < 0:
            raise ValueError("synthetic_eval_rows, synthetic_lm_steps and synthetic_tower_steps must be >= 0")
        if self.synthetic_train_rows < 1:
            raise ValueError("synthetic_train_rows must be >= 1")
        if self.synthetic_tower_steps and not self.synthetic_studies:
            raise ValueError("synthetic_tower_steps needs synthetic_studies: true (it trains on CT study slices)")


def argument_classes() -> tuple[type, ...]:
    from .arguments import DataArguments, MambaVLMTrainingArguments, ModelArguments

    return ModelArguments, DataArguments, SyntheticDataArguments, MambaVLMTrainingArguments


_GROUP_TITLES = ("Model arguments", "Data arguments", "Synthetic-data arguments", "Training arguments")


def resolve_recipe_path(name_or_path: str | os.PathLike) -> Path:
    """A path, or a plain recipe name (`tiny_demo`) looked up in ./recipes, the repo and the package."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    package_dir = Path(__file__).resolve().parent.parent
    names = [path.name] if path.suffix in RECIPE_SUFFIXES else [path.name + s for s in RECIPE_SUFFIXES]
    searched = [Path.cwd() / "recipes", package_dir.parent / "recipes", package_dir / "recipes"]
    for directory in searched:
        for name in names:
            if (directory / name).is_file():
                return directory / name
    raise FileNotFoundError(
        f"Recipe {str(name_or_path)!r} not found (looked for it as a path and in "
        f"{', '.join(str(d) for d in searched)}). Available: {', '.join(available_recipes()) or 'none'}"
    )


def available_recipes() -> list[str]:
    package_dir = Path(__file__).resolve().parent.parent
    found = set()
    for directory in (Path.cwd() / "recipes", package_dir.parent / "recipes", package_dir / "recipes"):
        if directory.is_dir():
            found.update(p.stem for p in directory.iterdir() if p.suffix in RECIPE_SUFFIXES)
    return sorted(found)


def load_recipe_dict(path: str | os.PathLike) -> dict:
    import yaml

    with open(path, encoding="utf-8") as handle:
        data = yaml.safe_load(handle) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: a recipe is a flat YAML mapping of key: value, got {type(data).__name__}")
    return data


def _parser():
    from transformers import HfArgumentParser

    return HfArgumentParser(argument_classes())


def _actions_by_key(parser) -> dict[str, argparse.Action]:
    return {a.dest: a for a in parser._actions if a.dest != "help"}


def valid_keys() -> dict[str, list[str]]:
    """Group title -> field names, in declaration order."""
    return {t: [f.name for f in dataclasses.fields(c) if f.init] for t, c in zip(_GROUP_TITLES, argument_classes())}


def check_keys(keys, source: str) -> None:
    """Raise a `ValueError` that names the unknown keys, suggests close matches and lists valid ones."""
    groups = valid_keys()
    known = {k for names in groups.values() for k in names}
    unknown = [k for k in keys if k not in known]
    if not unknown:
        return
    hints = []
    for key in unknown:
        close = difflib.get_close_matches(key, sorted(known), n=1)
        hints.append(f"{key!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
    listing = "\n".join(f"  {title}: {', '.join(names)}" for title, names in groups.items())
    raise ValueError(f"Unknown key(s) in {source}: {', '.join(hints)}.\nValid keys:\n{listing}")


def overrides_to_dict(overrides, parser=None) -> dict:
    """`{"max_steps": 3}`, `["--max_steps", "3", "--use_lora"]` or `["max_steps=3"]` -> typed dict."""
    if not overrides:
        return {}
    if isinstance(overrides, dict):
        check_keys(list(overrides), "the overrides")
        return dict(overrides)
    items = [str(item) for item in overrides]
    if not any(item.startswith("--") for item in items):  # ["max_steps=3", "use_lora=true"]
        items = [part for item in items for part in (f"--{item.split('=', 1)[0]}", item.split("=", 1)[1])]
    argv = items
    keys = [a[2:].split("=", 1)[0] for a in argv if a.startswith("--")]
    check_keys(keys, "the command-line overrides")
    parser = parser or _parser()
    for action in parser._actions:
        action.default = argparse.SUPPRESS
        action.required = False
    namespace, rest = parser.parse_known_args(argv)
    if rest:
        raise ValueError(f"Could not parse the overrides {rest}: write them as --key value")
    return vars(namespace)


def _coerce(value, action: argparse.Action | None):
    """YAML strings -> the field's type, with the same converters as the command line."""
    if action is None or action.type in (None, str) or not isinstance(value, str):
        if isinstance(value, list) and action is not None and action.type not in (None, str):
            return [action.type(v) if isinstance(v, str) else v for v in value]
        return value
    if value.strip().lower() in ("null", "none", "~") and action.type is not bool:
        return None
    return action.type(value)


def parse_recipe(recipe, overrides=None):
    """Recipe path/name (or an already loaded dict) + overrides -> (model, data, synthetic, training) args.

    Also returns a dict with the recipe path, its raw mapping and the overrides, for the model card.
    """
    from transformers import HfArgumentParser

    if isinstance(recipe, dict):
        path, raw = None, dict(recipe)
    else:
        path = resolve_recipe_path(recipe)
        raw = load_recipe_dict(path)
    check_keys(list(raw), str(path) if path else "the recipe")
    extra = overrides_to_dict(overrides)
    merged = {**raw, **extra}
    actions = _actions_by_key(HfArgumentParser(argument_classes()))
    merged = {k: _coerce(v, actions.get(k)) for k, v in merged.items()}
    model_args, data_args, synth_args, training_args = HfArgumentParser(argument_classes()).parse_dict(
        merged, allow_extra_keys=False
    )
    info = {"recipe_path": str(path) if path else None, "recipe": raw, "overrides": extra}
    return model_args, data_args, synth_args, training_args, info


__all__ = [
    "SyntheticDataArguments",
    "argument_classes",
    "available_recipes",
    "check_keys",
    "load_recipe_dict",
    "overrides_to_dict",
    "parse_recipe",
    "resolve_recipe_path",
    "valid_keys",
]
