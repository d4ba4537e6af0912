"""Every training stage, defined once: what rows it trains on, which recipe (and so which TRL trainer) runs it, the
methods it works with, whether it needs a reference model, its usual learning rates, and the progress it reports.
The config schema, the checks, the planner and the training child read this table; adding a stage is one StageSpec
here plus its recipe class, named by the spec.

Import-light (no torch) like `methods`: the server and the config schema read it; the recipe is resolved by name in
the training child (`recipe_class`). A recipe is a class taking (config, run, state, stop) with `setup()`,
`train() -> stopped`, `save()` and `report(job_seconds)`; `SFTRecipe` is the one to subclass (its
`_trainer_arguments()` are the TrainingArguments every stage shares, `_finish_trainer()` the shared callbacks).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Literal

DataShape = Literal["sft", "pairs", "unpaired", "prompts"]


@dataclass(frozen=True)
class StageSpec:
    name: str
    summary: str
    data: DataShape  # sft: demonstrations; pairs: prompt/chosen/rejected; unpaired: prompt/completion/label (KTO)
    recipe: str  # "module:Class" of the recipe run by `python -m lmtuner_core.training.train`
    # Learning rates practitioners start from, for methods that train every weight and for adapters; None: the method's.
    learning_rate_full: float | None = None
    learning_rate_adapter: float | None = None
    # The loss compares with a frozen copy of the starting policy. With an adapter method that is the base with the
    # adapter switched off (no second copy); with full weights it is a second model in memory.
    reference_model: bool = False
    # The model is a sequence classifier with a scalar head (reward model), not a causal LM.
    scalar_head: bool = False
    # Methods refused for this stage, with why and what to use instead.
    refused_methods: dict[str, str] = field(default_factory=dict)
    beta: float | None = None  # the usual `preference.beta` (DPO/KTO: pull to the reference; ORPO: odds-ratio weight)
    # Keys of metrics.jsonl records that job_status shows while this stage runs.
    progress_keys: tuple[str, ...] = ()
    not_yet: str | None = None  # why this version cannot run it, with what to use instead

    def learning_rate(self, method_learning_rate: float, adapter: bool) -> float:
        """The stage's usual learning rate for this kind of method, else the method's own."""
        rate = self.learning_rate_adapter if adapter else self.learning_rate_full
        return rate if rate is not None else method_learning_rate


# grpo's refusal of LOMO, as its branch wrote it (the preference stages were measured to train with LOMO).
_FUSED = "updates weights inside the backward pass, which the preference trainers' loss does not go through"
_PAIR_METRICS = ("rewards_margin", "rewards_accuracy", "rewards_chosen", "rewards_rejected")
_PREFERENCE = "lmtuner_core.training.preference:PreferenceRecipe"

STAGES: dict[str, StageSpec] = {
    spec.name: spec
    for spec in (
        StageSpec("sft", "supervised fine-tuning on demonstrations (TRL SFTTrainer)", "sft",
                  "lmtuner_core.training.recipe:SFTRecipe"),
        StageSpec("dpo", "direct preference optimization on chosen/rejected pairs (TRL DPOTrainer)", "pairs",
                  _PREFERENCE, 5e-6, 5e-5, reference_model=True, beta=0.1,
                  progress_keys=_PAIR_METRICS),
        StageSpec("orpo", "odds-ratio preference optimization: SFT and preference in one loss, no reference model "
                  "(TRL ORPOTrainer)", "pairs", _PREFERENCE, 8e-6, 8e-5, beta=0.1,
                  progress_keys=_PAIR_METRICS),
        StageSpec("simpo", "simple preference optimization: length-normalized reward with a margin, no reference "
                  "model (TRL CPOTrainer, loss_type 'simpo')", "pairs", _PREFERENCE, 1e-6, 1e-5, beta=2.0,
                  progress_keys=_PAIR_METRICS),
        StageSpec("kto", "Kahneman-Tversky optimization on single answers marked desirable or not (TRL KTOTrainer)",
                  "unpaired", _PREFERENCE, 5e-6, 5e-5, reference_model=True, beta=0.1,
                  progress_keys=("rewards_margin", "rewards_chosen", "rewards_rejected")),  # KTO logs no accuracy
        StageSpec("reward", "a reward model: a scalar head trained to score chosen above rejected (TRL "
                  "RewardTrainer)", "pairs", _PREFERENCE, 1e-5, 1e-4, scalar_head=True,
                  progress_keys=("rewards_accuracy", "rewards_margin"),
                  refused_methods={"freeze": "trains only the last layers of the causal LM, while the "
                                   "reward head is new and must train"}),
        StageSpec("grpo", "group relative policy optimization: sampled answers scored by graders (TRL GRPOTrainer)",
                  # adapters: 2e-4, measured (bench/grpo_dates_iso.json: 0.18 -> 0.79 on SmolLM2 in 40 steps)
                  "prompts", "lmtuner_core.training.grpo:GRPORecipe", 1e-6, 2e-4,
                  progress_keys=("reward_mean", "reward_std"),
                  refused_methods={"lomo": _FUSED, "adalomo": _FUSED}),
    )
}  # fmt: skip
STAGE_NAMES = tuple(STAGES)


def stage_refusal(stage: str, method: str) -> str | None:
    """Why `method` cannot train `stage` (a sentence naming what to use instead), or None when it can."""
    spec = STAGES[stage]
    if spec.not_yet:
        return f"{stage!r} is not available in this version: {spec.not_yet}"
    why = spec.refused_methods.get(method)
    if why:
        usable = [m for m in _method_names() if m not in spec.refused_methods]
        return f"{stage!r} cannot train with {method!r}: it {why}; use one of {', '.join(usable)}"
    return None


def _method_names() -> tuple[str, ...]:
    from lmtuner_core.methods import METHOD_NAMES

    return METHOD_NAMES


def recipe_class(stage: str) -> type:
    """The recipe class that runs `stage` (imported here, in the training child: it brings torch and TRL)."""
    module, _, name = STAGES[stage].recipe.partition(":")
    return getattr(importlib.import_module(module), name)


def stage_data_refusal(stage: str, fmt: str) -> str | None:
    """Why rows of format `fmt` cannot train `stage` (naming the stages they can train), or None when they can."""
    from lmtuner_core.data.preference import data_shape

    shape = data_shape(fmt)
    wanted = STAGES[stage].data
    if shape == wanted or (wanted == "unpaired" and shape == "pairs"):  # KTO takes each pair as two labelled answers
        return None
    fits = [name for name, spec in STAGES.items() if spec.data == shape and not spec.not_yet]
    if shape == "pairs":
        fits.append("kto")
    described = {"sft": "demonstrations (prompt and answer)", "pairs": "preference pairs (chosen / rejected)",
                 "unpaired": "single answers labelled desirable or not (KTO)", "prompts": "prompts only"}  # fmt: skip
    return (
        f"stage {stage!r} trains on {described[wanted]}, but the dataset holds {described[shape]} ({fmt}); set "
        f"stage to one of {', '.join(repr(f) for f in fits) or 'none available'}, or give {described[wanted]}"
    )
