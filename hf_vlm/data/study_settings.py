"""`StudyPreprocessing`: every setting that turns one CT study into the slices a model sees.

Why one object: training, `generate`, `serve`, evaluation and the vision feature cache must
apply the same windows, slice count, sampling, spacing, crop and image size, or a model is
evaluated on pixels that differ from the ones it was trained on. The object is saved in the
processor config (`to_dict` / `from_dict`, JSON-safe) and its `fingerprint()` goes into the
feature-cache key. The window presets come from `hf_vlm.data.images.WINDOW_PRESETS` (the one
source of the numbers); a window is written as a preset name, ``"W1500/L-600"``, a
``(level, width)`` pair or ``{"level": .., "width": ..}``.

Conventions (see `hf_vlm.data.studies`): slices are axial planes of the volume reoriented to
RAS, ordered inferior -> superior; relative z is the slice centre as a fraction of the sampled
extent, so a single slice has z = 0.5.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, fields
from importlib import metadata
from typing import Any

from .images import WINDOW_PRESETS

# Bump when the loading / preprocessing code changes what pixels a setting produces.
STUDY_PREPROCESSING_VERSION = 1
SLICE_SAMPLINGS = ("uniform", "all", "stride", "middle", "mip")
EXTENTS = ("body", "lung", "full")
CROPS = ("body", "none")
_NUM = r"\s*([-+]?\d+(?:\.\d*)?)\s*"
_WL = re.compile(rf"^\s*(?:W{_NUM}/\s*L{_NUM}|L{_NUM}/\s*W{_NUM})$", re.IGNORECASE)  # W1500/L-600 or L-600/W1500


@dataclass(frozen=True)
class Window:
    """A linear CT window: HU in [level - width/2, level + width/2] maps to [0, 1]."""

    level: float
    width: float
    name: str | None = None  # preset name, None for a custom window

    @property
    def low(self) -> float:
        return self.level - self.width / 2.0

    @property
    def high(self) -> float:
        return self.level + self.width / 2.0

    def to_dict(self) -> dict:
        return {"name": self.name, "level": self.level, "width": self.width}


def parse_window(spec: Any) -> Window:
    """A preset name, ``"W1500/L-600"`` / ``"L-600/W1500"``, ``(level, width)`` or a dict -> `Window`."""
    allowed = (
        f"a preset name ({', '.join(WINDOW_PRESETS)}), 'W<width>/L<level>', (level, width) or {{'level', 'width'}}"
    )
    if isinstance(spec, Window):
        window = spec
    elif isinstance(spec, str) and spec.strip().lower() in WINDOW_PRESETS:
        name = spec.strip().lower()
        window = Window(*WINDOW_PRESETS[name], name=name)
    elif isinstance(spec, str) and _WL.match(spec):
        w1, l1, l2, w2 = _WL.match(spec).groups()
        window = Window(float(l1 if l1 is not None else l2), float(w1 if w1 is not None else w2))
    elif isinstance(spec, dict) and {"level", "width"} <= set(spec):
        window = Window(float(spec["level"]), float(spec["width"]))  # the name follows the numbers
    elif isinstance(spec, (list, tuple)) and len(spec) == 2 and not isinstance(spec[0], str):
        window = Window(float(spec[0]), float(spec[1]))
    else:
        raise ValueError(f"window {spec!r} is not {allowed}")
    if not window.width > 0:
        raise ValueError(f"window {spec!r}: width must be > 0, got {window.width}")
    if window.name is None:  # a custom window equal to a preset is that preset
        window = next(
            (
                Window(window.level, window.width, n)
                for n, lw in WINDOW_PRESETS.items()
                if lw == (window.level, window.width)
            ),
            window,
        )
    return window


def _choice(name: str, value: str, allowed: tuple[str, ...]) -> str:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {', '.join(allowed)}; got {value!r}")
    return value


@dataclass(frozen=True)
class StudyPreprocessing:
    """How one CSV row's image field becomes `(S, C, H, W)` slices (see the module docstring).

    Args:
        windows: CT windows, one channel each; one window is repeated to `channels`.
        channels: channels per slice given to the image processor (3 for RGB towers).
        slice_sampling: `uniform` (`num_slices` slices at the centres of equal bins of the
            extent), `all` slices of the extent, every `slice_stride`-th slice, or `middle`
            (the volume's middle slice, ignoring `extent`: the old one-slice behaviour), or `mip`:
            the extent cut into `num_slices` equal slabs, each given as its maximum-intensity
            projection (the slab MIPs radiologists read nodules on: a 4 mm nodule on one 5 mm
            slice of a 40 mm slab stays as bright as on its slice; docs/architecture.md "Studies").
        num_slices: slices taken by `uniform`, slabs made by `mip` (fewer when the extent has fewer).
        slice_stride: step of `stride`.
        extent: z range sampled: slices holding `body` (voxels > -500 HU), `lung`
            (lung-density voxels; falls back to `body` when there are none) or the `full` volume.
        target_spacing: resample to (x, y, z) mm first; None keeps the header's spacing, and a
            None entry keeps that axis.
        crop: `body` crops each slice in-plane to the body's bounding box, `none` keeps it.
        image_size: slices are padded to a square (with air) and resized to this many pixels;
            None keeps their size (the image processor resizes).
    """

    windows: tuple = ("lung",)
    channels: int = 3
    slice_sampling: str = "uniform"
    num_slices: int = 32
    slice_stride: int = 2
    extent: str = "body"
    target_spacing: tuple | None = None
    crop: str = "body"
    image_size: int | None = None

    def __post_init__(self):
        specs = (self.windows,) if isinstance(self.windows, (str, dict, Window)) else tuple(self.windows or ())
        if specs and len(specs) == 2 and all(isinstance(v, (int, float)) for v in specs):
            specs = (tuple(specs),)  # windows=(-600, 1500): one custom window, not two
        windows = tuple(parse_window(s) for s in specs)
        if not windows:
            raise ValueError("windows must name at least one window")
        set_ = lambda k, v: object.__setattr__(self, k, v)  # noqa: E731 (frozen dataclass)
        set_("windows", windows)
        for name in ("channels", "num_slices", "slice_stride"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1; got {value!r}")
        if len(windows) not in (1, self.channels):
            raise ValueError(
                f"{len(windows)} windows for {self.channels} channels: give 1 window (repeated) or one per channel"
            )
        _choice("slice_sampling", self.slice_sampling, SLICE_SAMPLINGS)
        _choice("extent", self.extent, EXTENTS)
        _choice("crop", self.crop, CROPS)
        if self.image_size is not None and (
            isinstance(self.image_size, bool) or not isinstance(self.image_size, int) or self.image_size < 1
        ):
            raise ValueError(f"image_size must be None or an integer >= 1; got {self.image_size!r}")
        spacing = self.target_spacing
        if spacing is not None:
            spacing = (spacing,) * 3 if isinstance(spacing, (int, float)) else tuple(spacing)
            if len(spacing) != 3 or any(v is not None and (isinstance(v, bool) or not float(v) > 0) for v in spacing):
                raise ValueError(
                    f"target_spacing must be None or 3 values (x, y, z) in mm, each > 0 or None; "
                    f"got {self.target_spacing!r}"
                )
            spacing = (
                None if all(v is None for v in spacing) else tuple(None if v is None else float(v) for v in spacing)
            )
        set_("target_spacing", spacing)

    # --- serialisation ---------------------------------------------------------------------------
    def to_dict(self) -> dict:
        """JSON-safe dict (for the processor config); `from_dict(to_dict())` is equal to self."""
        out = asdict(self)
        out["windows"] = [w.to_dict() for w in self.windows]
        out["target_spacing"] = list(self.target_spacing) if self.target_spacing else None
        return out

    @classmethod
    def from_dict(cls, data: dict | None) -> StudyPreprocessing:
        """Inverse of `to_dict`; an unknown key is an error naming the allowed ones."""
        data = dict(data or {})
        allowed = [f.name for f in fields(cls)]
        unknown = sorted(set(data) - set(allowed))
        if unknown:
            raise ValueError(f"unknown study preprocessing setting(s) {unknown}; allowed: {', '.join(allowed)}")
        return cls(**data)

    def fingerprint(self) -> dict:
        """What the produced pixels depend on (for the vision feature cache key): resolved window
        numbers, only the fields the chosen sampling uses, the code version and MONAI's version."""
        out = {
            "study_preprocessing_version": STUDY_PREPROCESSING_VERSION,
            "windows": [[w.level, w.width] for w in self.windows],
            "channels": self.channels,
            "slice_sampling": self.slice_sampling,
            "target_spacing": list(self.target_spacing) if self.target_spacing else None,
            "crop": self.crop,
            "image_size": self.image_size,
        }
        if self.slice_sampling != "middle":
            out["extent"] = self.extent
        if self.slice_sampling in ("uniform", "mip"):
            out["num_slices"] = self.num_slices
        if self.slice_sampling == "stride":
            out["slice_stride"] = self.slice_stride
        try:
            out["monai"] = metadata.version("monai")
        except metadata.PackageNotFoundError:
            out["monai"] = None
        return out

    @classmethod
    def legacy_middle_slice(
        cls, window_center: float = WINDOW_PRESETS["lung"][0], window_width: float = WINDOW_PRESETS["lung"][1]
    ) -> StudyPreprocessing:
        """The settings equivalent to the pre-study loader with `max_slices=1` (a checkpoint
        without study settings): the volume's middle slice, one window, no crop, no resize."""
        return cls(windows=((window_center, window_width),), slice_sampling="middle", crop="none")


class StudySettingsMismatchError(ValueError):
    """An inference flag contradicts the study preprocessing a checkpoint was trained with."""


def check_study_flags(settings: StudyPreprocessing | None, requested: dict, checkpoint: str = "the checkpoint") -> None:
    """`generate` / `serve` flags (None = not given) against the processor's saved settings.

    Why: a model trained on 32 uniform slices in the lung window reads other pixels when run on
    8 slices or another window, and gets quietly worse; so a contradicting flag is an error
    naming both values, and omitting the flag uses the checkpoint's value.
    """
    given = {k: v for k, v in requested.items() if v is not None}
    if not given:
        return
    if settings is None:
        raise StudySettingsMismatchError(
            f"{checkpoint} was trained on 2-D images (its processor has no study settings), so "
            f"{', '.join('--' + k for k in given)} cannot apply; omit them"
        )
    problems = []
    for name, value in given.items():
        trained = getattr(settings, name)
        if name == "windows":
            value = tuple(parse_window(v) for v in ([value] if isinstance(value, str) else value))
            same = [(w.level, w.width) for w in value] == [(w.level, w.width) for w in trained]
            shown, trained_shown = (
                [w.name or f"W{w.width:g}/L{w.level:g}" for w in value],
                [w.name or f"W{w.width:g}/L{w.level:g}" for w in trained],
            )
        else:
            same, shown, trained_shown = value == trained, value, trained
        if not same:
            problems.append(
                f"--{name} {shown} differs from the training setting of {checkpoint}: {name}={trained_shown}"
            )
    if problems:
        raise StudySettingsMismatchError(
            "; ".join(problems) + ". A model must run with the preprocessing it was "
            "trained with (omit the flag to use the checkpoint's value)."
        )
