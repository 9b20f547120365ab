"""`hf-vlm clean INPUT.csv|INPUT.xlsx [options]`: caption cleaning from the command line.

The options are generated from ``CleaningConfig``'s fields (name, type, default, help), so the
defaults live in one place. A boolean field that defaults to False becomes ``--name``; one that
defaults to True becomes ``--no_name`` (``--no_dedup``). Options left out are not passed, so
the dataclass default applies.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import typing

from hf_vlm.data.cleaning import REASONS, CleaningConfig

EPILOG = "rejection reasons (first failing check wins):\n" + "\n".join(
    f"  {name:<24} {meaning}" for name, meaning in REASONS.items()
)


def _base_type(annotation) -> type:
    """``Optional[int]`` -> int, ``bool`` -> bool (annotations are strings under PEP 563)."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    return args[0] if args else annotation


def add_config_arguments(parser: argparse.ArgumentParser, config_cls=CleaningConfig) -> None:
    """One option per dataclass field, default ``SUPPRESS`` so unset options keep the field default."""
    hints = typing.get_type_hints(config_cls)
    group = parser.add_argument_group("cleaning options")
    for f in dataclasses.fields(config_cls):
        kind, help_text = _base_type(hints[f.name]), f.metadata.get("help", "")
        if kind is bool:
            flag = f"--no_{f.name}" if f.default else f"--{f.name}"
            group.add_argument(
                flag,
                dest=f.name,
                action="store_false" if f.default else "store_true",
                default=argparse.SUPPRESS,
                help=("Turn off: " if f.default else "") + help_text,
            )
        else:
            shown = "" if f.default is None or "default" in help_text else f" (default: {f.default})"
            group.add_argument(
                f"--{f.name}",
                type=kind,
                default=argparse.SUPPRESS,
                metavar=kind.__name__.upper(),
                help=help_text + shown,
            )


def config_from_args(args: argparse.Namespace, config_cls=CleaningConfig):
    names = {f.name for f in dataclasses.fields(config_cls)}
    return config_cls(**{k: v for k, v in vars(args).items() if k in names})


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = EPILOG
    parser.add_argument("inputs", nargs="+", metavar="INPUT", help="caption CSV/TSV or Excel (.xlsx) file(s)")
    parser.add_argument(
        "--output_dir", default=None, help="where *_clean.csv / *_rejects.csv go (default: next to the input)"
    )
    parser.add_argument("--quiet", action="store_true", help="do not print the summary table")
    add_config_arguments(parser)


def run(args: argparse.Namespace) -> int:
    from hf_vlm.data.cleaning import clean_captions

    try:
        config = config_from_args(args)
    except ValueError as e:
        print(f"hf-vlm clean: {e}", file=sys.stderr)
        return 2
    status = 0
    for path in args.inputs:
        try:
            report = clean_captions(path, args.output_dir, config, verbose=not args.quiet)
        except (OSError, ValueError) as e:  # missing file, unparsable CSV, unknown column
            print(f"hf-vlm clean: {e}", file=sys.stderr)
            return 2
        if report.kept == 0:
            print(f"hf-vlm clean: no row of {path} survived cleaning; see {report.rejects_path}", file=sys.stderr)
            status = 1
    return status


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="hf-vlm clean", description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
