"""Training collator: right-pad, and supervise only the answer and its EOS.

Labels are -100 on visual tokens, prompt tokens and padding, decided by *position*
(`prompt_length` from the processor, the real length of each row). Masking by
`input_ids == pad_token_id` is wrong for Mamba: its tokenizer has pad = eos, so the answer's
EOS would be masked and the model would never learn to stop.

Truncation never cuts visual or prompt tokens: the answer is shortened (and counted), and a
row whose prompt alone does not fit raises `PromptTooLongError`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100


class PromptTooLongError(ValueError):
    """The visual + prompt tokens of a row exceed `max_length`: nothing can be supervised."""


def describe_row(feature: dict, position: int) -> str:
    """ "<file> row_id <id>" for error messages: the CSV row, not the position in the batch."""
    row_id = feature.get("row_id")
    where = f"row_id {row_id}" if row_id is not None else f"batch position {position} (no row_id)"
    source = feature.get("source_file")
    return f"{source} {where}" if source else where


@dataclass
class DataCollatorForMambaVLM:
    """Collate `MambaVLMProcessor.encode_example` outputs into a training batch.

    Args:
        pad_token_id: id used for padding (may equal the EOS id).
        max_length: total token budget per row (visual + prompt + answer); None = no limit.
        image_token_id: placeholder id; checked to lie inside the prompt part.
        tokenizer: optional, only to log one decoded example on the first batch.
        log_first_example: log prompt/answer token counts and the supervised text once.
    """

    pad_token_id: int
    max_length: int | None = None
    image_token_id: int | None = None
    tokenizer: object | None = None
    log_first_example: bool = True
    truncated_answers: int = field(default=0, init=False)
    rows_seen: int = field(default=0, init=False)
    _logged: bool = field(default=False, init=False, repr=False)

    def _truncate(self, ids: list[int], prompt_length: int, row) -> list[int]:
        if self.max_length is None or len(ids) <= self.max_length:
            return ids
        if prompt_length >= self.max_length:
            raise PromptTooLongError(
                f"{row}: visual + prompt tokens ({prompt_length}) do not fit in max_length="
                f"{self.max_length}, so no answer token could be supervised. Raise max_length, lower "
                "max_visual_tokens, or shorten the prompt."
            )
        self.truncated_answers += 1
        if self.truncated_answers in (1, 10, 100) or self.truncated_answers % 1000 == 0:
            logger.warning(
                "Answer truncated to fit max_length=%d (%d rows so far); raise max_length if reports are cut",
                self.max_length,
                self.truncated_answers,
            )
        return ids[: self.max_length]

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        rows, prompt_lengths = [], []
        for i, feature in enumerate(features):
            ids = list(feature["input_ids"])
            prompt_length = int(feature["prompt_length"])
            row = describe_row(feature, i)
            if prompt_length >= len(ids):
                raise ValueError(
                    f"{row}: no answer tokens after the prompt ({prompt_length} prompt tokens, "
                    f"{len(ids)} in total); empty reports cannot be trained on"
                )
            if self.image_token_id is not None and self.image_token_id in ids[prompt_length:]:
                raise ValueError(
                    f"{row}: an <image> placeholder lies in the answer part (the caption contains "
                    "'<image>'); it must be in the prompt only. `hf-vlm clean` rejects such captions"
                )
            rows.append(self._truncate(ids, prompt_length, row))
            prompt_lengths.append(prompt_length)
        self.rows_seen += len(rows)

        width = max(len(r) for r in rows)
        input_ids = torch.full((len(rows), width), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
        labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
        for i, (ids, prompt_length) in enumerate(zip(rows, prompt_lengths)):
            row = torch.tensor(ids, dtype=torch.long)
            input_ids[i, : len(ids)] = row
            attention_mask[i, : len(ids)] = 1
            labels[i, prompt_length : len(ids)] = row[prompt_length:]  # answer (+ EOS) only

        batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
        if "pixel_values" in features[0]:
            batch["pixel_values"] = torch.cat([torch.as_tensor(f["pixel_values"]) for f in features], dim=0)
        if "vision_features" in features[0]:
            batch["vision_features"] = torch.cat([torch.as_tensor(f["vision_features"]) for f in features], dim=0)
        if "slice_z" in features[0]:  # studies (hf_vlm.modeling_study): one per row, its slices in order
            zs = [torch.as_tensor(f["slice_z"], dtype=torch.float32).reshape(-1) for f in features]
            batch["slice_z"] = torch.cat(zs)
            batch["slice_counts"] = torch.tensor([len(z) for z in zs], dtype=torch.long)
        if self.log_first_example and not self._logged:
            self._log_example(rows[0], prompt_lengths[0])
        return batch

    def _log_example(self, ids: list[int], prompt_length: int) -> None:
        self._logged = True
        answer_ids = ids[prompt_length:]
        message = (
            f"First training example: prompt tokens {prompt_length} (incl. visual), answer tokens {len(answer_ids)}"
        )
        if self.tokenizer is not None:
            message += f"; supervised text: {self.tokenizer.decode(answer_ids)!r}"
        logger.info(message)
