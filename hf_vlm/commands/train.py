"""`hf-vlm train RECIPE.yaml [--key value ...]`: one training stage from a recipe.

Launch it through accelerate to pick the hardware (the recipe stays the same):

    accelerate launch --config_file accelerate_configs/single_gpu_bf16.yaml \\
        -m hf_vlm.cli train recipes/stage1_align.yaml
    accelerate launch --config_file accelerate_configs/cpu_2proc.yaml \\
        -m hf_vlm.cli train recipes/tiny_demo.yaml --max_steps 3

Exit codes: 0 saved; 1 stopped early by a guard (saved); 2 bad recipe or data; 3 NaN/Inf: nothing
saved as final, the last good checkpoint is printed; 4 stopped early by the "not learning" verdict
(a plateau with no vision gap, see hf_vlm/training/verdict.py): the weights so far and the last
checkpoint are kept. Every run ends with the training-health table. This module only parses arguments and prints;
the run itself, top to bottom, is
`hf_vlm.training.run.train_from_recipe` (the demo and the tests call it in-process).
"""

from __future__ import annotations

import argparse
import logging

logger = logging.getLogger("hf_vlm.train")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("recipe", help="recipe YAML path, or a name from recipes/ (e.g. tiny_demo)")
    parser.add_argument(
        "overrides",
        nargs=argparse.REMAINDER,
        help="--key value pairs that override recipe keys (e.g. --max_steps 3 --learning_rate 1e-5)",
    )


def run(args) -> int:
    from ..training.run import train_from_recipe

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        result = train_from_recipe(args.recipe, args.overrides)
    except (ValueError, FileNotFoundError) as error:
        logger.error("%s", error)
        return 2
    metrics = result["metrics"]
    health = result.get("health")
    if health:
        from ..training.verdict import format_health_table

        print(f"Training health (verdict: {health['verdict']}):\n{format_health_table(health['table'])}")
    if result.get("nonfinite_step") is not None:
        good = result.get("last_good_checkpoint")
        print(
            f"Training stopped: NaN/Inf at step {result['nonfinite_step']}. Nothing was saved as the final model "
            f"in {result['output_dir']}.\n"
            + (
                f"Last good checkpoint: {good} (lower the learning rate, then --resume_from_checkpoint {good})"
                if good
                else "No good checkpoint was written: lower the learning rate and start again."
            )
        )
        print("\n".join(result["guard_trips"]))
        return 3
    shown = ", ".join(f"{k}={v:.4g}" for k, v in sorted(metrics.items()) if isinstance(v, float))
    print(f"Saved to {result['output_dir']} ({shown})")
    if result.get("evaluation_error"):
        print(f"warning: the final evaluation failed (the model above is saved): {result['evaluation_error']}")
    if result["stopped_early"] and health and health.get("stopped_by") == "not_learning":
        from ..training.verdict import NOT_LEARNING_EXIT_CODE

        good = result.get("last_good_checkpoint")
        print(
            f"Training stopped early at step {result['global_step']}: the model is not learning to see (see the "
            f"table above). The weights so far are saved in {result['output_dir']}"
            + (f"; last checkpoint: {good}" if good else "")
            + ".\n"
            + "\n".join(result["guard_trips"])
        )
        return NOT_LEARNING_EXIT_CODE
    if result["stopped_early"] and result["guard_trips"]:
        print("Training stopped early because a guard tripped:\n" + "\n".join(result["guard_trips"]))
        return 1
    return 0
