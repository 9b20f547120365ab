"""Turn cleaned caption rows into model features, lazily, through `Dataset.with_transform`.

`load_caption_dataset` (hf_vlm.data.dataset) reads the cleaned CSV and resolves paths;
`decode_batch` loads the images of the accessed rows; the processor then builds token ids
and pixel values. Nothing is decoded up front, and the transform is a picklable dataclass,
so DataLoader workers work under Windows *spawn* too.
"""

from __future__ import annotations

from dataclasses import dataclass

from .dataset import decode_batch, load_caption_dataset
from .images import DEFAULT_MAX_SLICES, DEFAULT_WINDOW


@dataclass
class EncodeCaptionRows:
    """`with_transform` callable: batch of CSV rows -> processor features (see the collator)."""

    processor: object
    max_slices: int = DEFAULT_MAX_SLICES
    window_center: float | None = DEFAULT_WINDOW[0]
    window_width: float | None = DEFAULT_WINDOW[1]
    source_file: str | None = None  # the CSV, named in every error (and carried to the collator's)

    def __call__(self, batch: dict[str, list]) -> dict[str, list]:
        decoded = decode_batch(
            batch,
            max_slices=self.max_slices,
            image_root=None,  # paths were resolved into `image_files` when the CSV was loaded
            path_map=None,
            window_center=self.window_center,
            window_width=self.window_width,
            study_settings=getattr(self.processor, "study_settings", None),  # the processor's, by construction
        )
        out: dict[str, list] = {"input_ids": [], "prompt_length": [], "pixel_values": [], "row_id": []}
        if getattr(self.processor, "study_preprocessing", None) is not None:
            out["slice_z"] = []
        if self.source_file:
            out["source_file"] = []
        for images, prompt, caption, row_id in zip(
            decoded["images"], decoded["prompt"], decoded["caption"], decoded["row_id"]
        ):
            try:
                example = self.processor.encode_example(images, prompt or None, caption)
            except ValueError as error:  # two <image> markers, an empty answer ...: name the row
                where = f"{self.source_file} row_id {row_id}" if self.source_file else f"row_id {row_id}"
                raise ValueError(f"{where}: {error}") from error
            for key in ("input_ids", "prompt_length", "pixel_values", "slice_z"):
                if key in out:
                    out[key].append(example[key])
            out["row_id"].append(row_id)
            if self.source_file:
                out["source_file"].append(self.source_file)
        return out


def load_training_dataset(
    csv_path: str,
    processor,
    *,
    image_root: str | None = None,
    path_map=None,
    split: str | None = None,
    **transform_kwargs,
):
    """Cleaned caption CSV -> lazily encoded `datasets.Dataset` ready for the Trainer."""
    dataset = load_caption_dataset(csv_path, image_root=image_root, path_map=path_map, split=split)
    transform_kwargs.setdefault("source_file", str(csv_path))
    return dataset.with_transform(EncodeCaptionRows(processor, **transform_kwargs))
