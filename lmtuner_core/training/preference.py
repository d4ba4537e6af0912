"""PreferenceRecipe: DPO, ORPO, SimPO, KTO and reward models on TRL's trainers, in the SFT recipe's frame.

Supports: pairs (prompt / chosen / rejected, plain or conversational) for dpo, orpo, simpo and reward; unpaired
answers with a desirable label (or pairs, split into two labelled answers) for kto. Methods: every one the stage's
registry entry does not refuse (all of them; reward refuses freeze, whose frozen head could not learn). The
reference model of dpo and kto is the base with the adapter switched off for the LoRA family (TRL does this), a
second copy of the model for full weights; orpo, simpo and reward need none. The reward model is the same network
as a sequence classifier with a new one-output head (`model_setup`).
Held-out pairs (eval_dataset, or eval_fraction 'auto' of the data) give the held-out loss and TRL's reward metrics
during training, and the report: preference accuracy of the base and the tuned model (`preference_scoring`).
Not supported: packing (TRL's preference collators pad), the SFT report's generated answers and retention probe.

Read top to bottom as SFTRecipe: setup() builds tokenizer → data → model (base preference accuracy) → trainer.
"""

from __future__ import annotations

import time
import traceback
from typing import Any

import datasets

from lmtuner_core.config import PreferenceSettings
from lmtuner_core.data.chat_template import ensure_chat_template
from lmtuner_core.data.datasets import load_examples, split_eval
from lmtuner_core.data.preference import data_shape, unpaired_from_pairs
from lmtuner_core.errors import LmtunerError
from lmtuner_core.paths import AllowedRoots
from lmtuner_core.report.result import ResultReport, advise, verdict, write_report
from lmtuner_core.run import process_rank
from lmtuner_core.stages import STAGES, stage_data_refusal
from lmtuner_core.training.model_setup import apply_method, count_parameters, load_base_model
from lmtuner_core.training.recipe import SFTRecipe

REPORT_BATCH = 8


def _dpo(common: dict, config, settings: PreferenceSettings, beta: float):
    from trl import DPOConfig, DPOTrainer

    args = DPOConfig(**common, beta=beta, loss_type=[settings.loss_type or "sigmoid"], max_length=config.max_seq_len)
    return args, DPOTrainer


def _orpo(common: dict, config, settings: PreferenceSettings, beta: float):
    from trl.experimental.orpo import ORPOConfig, ORPOTrainer

    return ORPOConfig(**common, beta=beta, max_length=config.max_seq_len), ORPOTrainer


def _simpo(common: dict, config, settings: PreferenceSettings, beta: float):
    from trl.experimental.cpo import CPOConfig, CPOTrainer

    # TRL expresses SimPO as CPO's loss_type 'simpo' with the behaviour-cloning term off (cpo_alpha 0).
    gamma = 0.5 if settings.simpo_gamma is None else settings.simpo_gamma
    args = CPOConfig(**common, loss_type="simpo", cpo_alpha=0.0, beta=beta, simpo_gamma=gamma,
                     max_length=config.max_seq_len)  # fmt: skip
    return args, CPOTrainer


def _kto(common: dict, config, settings: PreferenceSettings, beta: float):
    from trl import KTOConfig, KTOTrainer

    args = KTOConfig(**common, beta=beta, max_length=config.max_seq_len,
                     desirable_weight=settings.desirable_weight or 1.0,
                     undesirable_weight=settings.undesirable_weight or 1.0)  # fmt: skip
    return args, KTOTrainer


def _reward(common: dict, config, settings: PreferenceSettings, beta: float):
    from trl import RewardConfig, RewardTrainer

    return RewardConfig(**common, max_length=config.max_seq_len), RewardTrainer


# stage -> (TRL config, TRL trainer class) builder; a preference stage is one entry here and one in `stages`.
TRAINERS = {"dpo": _dpo, "orpo": _orpo, "simpo": _simpo, "kto": _kto, "reward": _reward}


def as_dataset(rows: list[dict]) -> Any:
    """Rows in TRL's normal form as a datasets.Dataset (the `tools` column only when some row has tools)."""
    if not any(row.get("tools") for row in rows):
        rows = [{k: v for k, v in row.items() if k != "tools"} for row in rows]
    return datasets.Dataset.from_list(rows)


class PreferenceRecipe(SFTRecipe):
    """One preference stage (config.stage) on its TRL trainer; train(), save() and the callbacks are SFTRecipe's."""

    def _setup_data(self) -> None:
        self.state.update(phase="reading data")
        config, stage = self.config, STAGES[self.config.stage]
        loaded = load_examples(config.dataset, AllowedRoots(None))
        refusal = stage_data_refusal(config.stage, loaded.format)
        if refusal:
            raise LmtunerError(f"dataset: {refusal}", field="dataset")
        if config.eval_dataset is not None:
            train_rows = loaded.examples
            held = load_examples(config.eval_dataset, AllowedRoots(None))
            if data_shape(held.format) != data_shape(loaded.format):
                raise LmtunerError(f"eval_dataset: it holds {held.format} rows, the dataset {loaded.format} rows; give "
                                   "held-out rows of the same kind", field="eval_dataset")  # fmt: skip
            eval_rows = held.examples
            self.held_out_source = f"eval_dataset ({len(eval_rows)} rows)"
        else:
            fraction = config.dataset.eval_fraction
            train_rows, eval_rows = split_eval(loaded.examples, fraction, config.seed)
            self.held_out_source = (f"{len(eval_rows)} of {len(loaded.examples)} dataset rows held out at random "
                                    f"(eval_fraction {fraction}, seed {config.seed})")  # fmt: skip
        kinds = {isinstance(row["prompt"], str) for row in train_rows + eval_rows}
        if len(kinds) > 1:
            raise LmtunerError("dataset: some rows are plain text and some are role/content turns; TRL trains one kind "
                               "per dataset: make them all one kind", field="dataset")  # fmt: skip
        self.is_chat = kinds == {False}
        if self.is_chat and ensure_chat_template(self.tokenizer):
            print(
                "[lmtuner] the model has no chat template; using ChatML (<|im_start|>role ... <|im_end|>)", flush=True
            )
        shape = data_shape(loaded.format)
        self.held_out_pairs = eval_rows if shape == "pairs" else []
        if stage.data == "unpaired" and shape == "pairs":
            train_rows, eval_rows = unpaired_from_pairs(train_rows), unpaired_from_pairs(eval_rows)
            print("[lmtuner] kto on pairs: each pair gives its chosen answer as desirable, its rejected one as not",
                  flush=True)  # fmt: skip
        self.held_out_rows = eval_rows
        self.train_dataset = as_dataset(train_rows)
        self.eval_dataset = as_dataset(eval_rows) if eval_rows else None
        print(f"[lmtuner] data: {loaded.format} from {loaded.source.label}; {len(train_rows)} train rows, "
              f"{len(eval_rows)} eval rows, {len(loaded.skipped)} skipped; stage {config.stage}",
              flush=True)  # fmt: skip
        for reason in loaded.skipped[:20]:
            print(f"[lmtuner] skipped {reason}", flush=True)
        self.state.update(train_rows=len(train_rows), eval_rows=len(eval_rows), skipped_rows=len(loaded.skipped),
                          data_format=loaded.format, stage=config.stage)  # fmt: skip

    def _setup_model(self) -> None:
        self.state.update(phase="loading model")
        model = load_base_model(self.config, self.precision, self.compute_dtype)
        model.config.use_cache = False
        if STAGES[self.config.stage].scalar_head:
            model.config.pad_token_id = self.tokenizer.pad_token_id  # the head reads the last token before padding
        self.model = apply_method(model, self.config)
        self._setup_report()
        trainable, total = count_parameters(self.model)
        reference = self._reference_description()
        print(f"[lmtuner] model: {self.config.model} ({total / 1e6:.1f}M parameters), stage {self.config.stage}, "
              f"method {self.config.method}: {trainable / 1e6:.2f}M trainable, precision {self.precision}; "
              f"reference: {reference}", flush=True)  # fmt: skip

    def _reference_description(self) -> str:
        spec = STAGES[self.config.stage]
        if not spec.reference_model:
            return "none (the loss needs none)"
        if self.config.method in ("lora", "dora", "qlora", "lora-8bit"):
            return "the base model with the adapter switched off (no second copy)"
        return "a frozen copy of the model (a second copy in memory)"

    def _report_skipped(self) -> str | None:
        if not self.config.report.enabled:
            return "report: false"
        if process_rank()[2] > 1 or self.config.deepspeed is not None:
            return "several processes or DeepSpeed: run evaluate on the output instead"
        if not self.held_out_pairs:
            return (
                "no held-out pairs: give an eval_dataset of pairs, or more rows so eval_fraction 'auto' holds some out"
            )
        return None

    def _preference_accuracy(self, model: Any):
        from lmtuner_core.models.preference_scoring import preference_accuracy

        pairs = self.held_out_pairs[: self.config.report.max_rows]
        return preference_accuracy(model, self.tokenizer, pairs, scalar_head=STAGES[self.config.stage].scalar_head,
                                   batch_size=REPORT_BATCH, max_length=self.config.max_seq_len,
                                   stop=self.stop.is_set)  # fmt: skip

    def _setup_report(self) -> None:
        """Measures the base model's preference accuracy on the held-out pairs now, before any step."""
        self.report_runner = None
        self.report_skipped = self._report_skipped()
        if self.report_skipped:
            print(f"[lmtuner] result report: off ({self.report_skipped})", flush=True)
            return
        self.state.update(phase="scoring held-out pairs with the base model")
        started = time.monotonic()
        self.base_pairs = self._preference_accuracy(self.model)
        self.report_seconds = time.monotonic() - started
        self.report_runner = True
        what = "an untrained reward head" if STAGES[self.config.stage].scalar_head else "the base model"
        print(f"[lmtuner] result report: {what} prefers chosen on {self.base_pairs.accuracy:.1%} of "
              f"{self.base_pairs.pairs} held-out pairs ({self.report_seconds:.0f}s)", flush=True)  # fmt: skip

    def _setup_trainer(self) -> None:
        config, stage = self.config, STAGES[self.config.stage]
        settings = config.preference or PreferenceSettings()
        beta = settings.beta if settings.beta is not None else (stage.beta or 0.1)
        args, trainer_class = TRAINERS[config.stage](self._trainer_arguments(), config, settings, beta)
        self._build_trainer(trainer_class, args)

    def report(self, job_seconds: float) -> None:
        """Writes report.json: base vs tuned preference accuracy on the held-out pairs."""
        if self.report_runner is None or not self.trainer.is_world_process_zero():
            return
        self.state.update(phase="writing the result report")
        started = time.monotonic()
        try:
            tuned = self._preference_accuracy(self.trainer.model)
        except InterruptedError:
            print("[lmtuner] result report: stopped on request; the trained model is saved", flush=True)
            return
        except Exception:  # the model is saved: a report that fails must not fail the job
            traceback.print_exc()
            self.state.update(report_error="the result report failed (traceback in train.log); the model is saved")
            return
        seconds = self.report_seconds + time.monotonic() - started
        scorer = ("the reward head's score" if STAGES[self.config.stage].scalar_head else
                  "the summed log-probability of the answer given the prompt")  # fmt: skip
        report = ResultReport(
            verdict=verdict(self.base_pairs.accuracy, tuned.accuracy, None),
            metric="preference_accuracy",
            metric_reason=f"share of held-out pairs whose chosen answer the model prefers by {scorer} (chance: 0.5)",
            base=round(self.base_pairs.accuracy, 4), tuned=round(tuned.accuracy, 4), held_out_rows=tuned.pairs,
            held_out_source=self.held_out_source, retention=None, held_out_loss=self.held_out_loss(),
            seconds=round(seconds, 1), share_of_job=round(seconds / job_seconds, 3) if job_seconds else None,
        )  # fmt: skip
        report.advice, report.next_config = advise(report, self.config.model_dump())
        write_report(self.run.root, report)
        print(f"[lmtuner] result report ({seconds:.0f}s): preference accuracy {report.base} -> {report.tuned} on "
              f"{report.held_out_rows} held-out pairs: {report.verdict}", flush=True)  # fmt: skip

    @property
    def packing(self) -> bool:
        return False  # TRL's preference collators pad each batch
