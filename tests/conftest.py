"""Shared fixtures: a locally trained tokenizer and micro models saved/loaded through from_pretrained.

Nothing is downloaded: configs are built in code, saved to a temp dir and loaded back through
the same `from_pretrained` path a real checkpoint uses.
"""

from __future__ import annotations

import os
import random

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(scope="session")
def report_texts():
    from hf_vlm.synthetic import DEFAULT_PROMPT, draw_facts, write_report

    rng = random.Random(0)
    return [write_report(draw_facts(rng), rng) for _ in range(300)] + [DEFAULT_PROMPT + "\n"] * 20


@pytest.fixture(scope="session")
def tokenizer(report_texts):
    from hf_vlm.tokenization import train_report_tokenizer

    return train_report_tokenizer(report_texts, vocab_size=300)


@pytest.fixture(scope="session")
def micro_processor(tokenizer):
    from transformers import ViTImageProcessorPil

    from hf_vlm import MambaVLMProcessor
    from hf_vlm.presets import tiny_max_visual_tokens, tiny_vision_config

    size = tiny_vision_config("micro").image_size
    return MambaVLMProcessor(
        ViTImageProcessorPil(size={"height": size, "width": size}),
        tokenizer,
        max_visual_tokens=tiny_max_visual_tokens("micro"),
    )


@pytest.fixture(scope="session")
def micro_config(micro_processor):
    """Factory: the micro `MambaVLMConfig` sized to `micro_processor`, with `overrides` applied."""
    from hf_vlm import MambaVLMConfig
    from hf_vlm.presets import tiny_text_config, tiny_vision_config

    def build(**overrides):
        tokenizer = micro_processor.tokenizer
        kwargs = dict(
            vision_config=tiny_vision_config("micro"),
            text_config=tiny_text_config(len(tokenizer), "micro", pad_token_id=tokenizer.pad_token_id),
            max_visual_tokens=micro_processor.max_visual_tokens,
            image_token_id=micro_processor.image_token_id,
        )
        kwargs.update(overrides)
        return MambaVLMConfig(**kwargs)

    return build


@pytest.fixture
def micro_model(micro_config):
    from hf_vlm import MambaVLMForConditionalGeneration

    torch.manual_seed(0)
    return MambaVLMForConditionalGeneration(micro_config()).eval()


@pytest.fixture(scope="session")
def ct_images():
    from hf_vlm.synthetic import draw_facts, render_slice

    rng = random.Random(1)
    return [render_slice(draw_facts(rng), 32, rng) for _ in range(4)]


@pytest.fixture(scope="module")
def csvs(tmp_path_factory):
    """Synthetic train (16 rows) and eval (8 rows) caption CSVs with 32-px slices."""
    from hf_vlm.synthetic import make_synthetic_dataset

    root = str(tmp_path_factory.mktemp("trainer_data"))
    return make_synthetic_dataset(root, 16, seed=0, image_size=32), make_synthetic_dataset(
        root, 8, seed=1, image_size=32, split="eval"
    )


@pytest.fixture(scope="session")
def make_args():
    """Factory: fast CPU `MambaVLMTrainingArguments` for 2-step runs in `out`; `overrides` win."""
    from hf_vlm.training import MambaVLMTrainingArguments

    def build(out, **overrides):
        kwargs = dict(
            output_dir=str(out),
            max_steps=2,
            per_device_train_batch_size=4,
            per_device_eval_batch_size=4,
            logging_steps=1,
            save_strategy="no",
            use_cpu=True,
            disable_tqdm=True,
            dataloader_num_workers=0,
            vision_probe=False,
            plot_loss=False,
            seed=0,
        )
        kwargs.update(overrides)
        return MambaVLMTrainingArguments(**kwargs)

    return build


@pytest.fixture(scope="module")
def micro_trainer(micro_processor, micro_config, make_args, csvs):
    """Factory: `MambaVLMTrainer` in `out` on a fresh micro model (seed 0) and the `csvs` data."""
    from hf_vlm import MambaVLMForConditionalGeneration
    from hf_vlm.data.encoding import load_training_dataset
    from hf_vlm.training import MambaVLMTrainer

    def build(out, model=None, collator=None, eval_data=False, config_overrides=None, trainer_kwargs=None, **overrides):
        torch.manual_seed(0)
        if model is None:
            model = MambaVLMForConditionalGeneration(micro_config(**(config_overrides or {})))
        return MambaVLMTrainer(
            model=model,
            args=make_args(out, **overrides),
            train_dataset=load_training_dataset(csvs[0], micro_processor),
            eval_dataset=load_training_dataset(csvs[1], micro_processor) if eval_data else None,
            processing_class=micro_processor,
            data_collator=collator,
            **(trainer_kwargs or {}),
        )

    return build


@pytest.fixture(scope="session")
def tiny_checkpoint():
    """Factory: `(checkpoint_dir, assets)` of a micro VLM saved under `root` (8-bit LLM if asked)."""

    def build(root, llm_8bit: bool = False):
        """A micro checkpoint whose greedy reports are long and varied (an untrained micro LM
        otherwise answers EOS at once): random, untied output head and a loud bridge."""
        from hf_vlm import MambaVLMForConditionalGeneration, MambaVLMProcessor
        from hf_vlm.demo_assets import build_demo_assets
        from hf_vlm.loading import bnb_quantization_config

        assets = build_demo_assets(str(root / "assets"), n_train=16, n_eval=4, preset="micro", lm_steps=0)
        processor = MambaVLMProcessor.from_pretrained(assets.processor_path)
        torch.manual_seed(0)
        model = MambaVLMForConditionalGeneration.from_components(
            assets.vision_path,
            assets.llm_path,
            max_visual_tokens=processor.max_visual_tokens,
            image_token_id=processor.image_token_id,
            llm_quantization_config=bnb_quantization_config() if llm_8bit else None,
        )
        if not llm_8bit:
            with torch.no_grad():
                model.get_input_embeddings().weight.normal_(0, 1.0)
                for param in model.bridge.parameters():
                    param.normal_(0, 2.0)
                for layer in model.language_model.backbone.layers:  # let the context, not the last token, decide
                    layer.mixer.in_proj.weight.normal_(0, 0.3)
                    layer.mixer.out_proj.weight.normal_(0, 0.3)
            for config in (model.config, model.config.text_config, model.language_model.config):
                config.tie_word_embeddings = False
            model.language_model.lm_head.weight = torch.nn.Parameter(
                torch.randn_like(model.language_model.lm_head.weight)
            )
        checkpoint = root / ("ckpt8" if llm_8bit else "ckpt")
        model.save_pretrained(checkpoint)
        processor.save_pretrained(checkpoint)
        return checkpoint, assets

    return build
