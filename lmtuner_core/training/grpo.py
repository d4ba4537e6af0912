"""GRPORecipe: group relative policy optimization on prompts-only rows, on TRL's GRPOTrainer, with the job's graders
as the reward.

Supports: methods full, freeze, lora, dora, qlora, lora-8bit (the model is built as for SFT, `model_setup`); rows
{'prompt': text or conversation, + the columns graders read}; the graders of `lmtuner_core.graders` (their weighted
mean is the one reward); answers sampled with transformers, or with vLLM colocated in the training process on CUDA
(grpo.engine); a KL penalty towards the starting model when grpo.beta > 0 (TRL then keeps a reference model: for an
adapter method the base with the adapter switched off, else a second copy); checkpoints every `save_steps`; stopping
on SIGTERM with a checkpoint; `metrics.jsonl` with `reward_mean` / `reward_std` beside the loss, for job_status and
the plot. Not supported: the result report (compare base and tuned with `evaluate` given the same graders), replay,
packing (TRL pads the sampled answers itself), lomo/adalomo.

Read top to bottom: setup() builds tokenizer → data → model → graders → trainer; train(); save().
"""

from __future__ import annotations

import importlib.util
import time

import datasets
import torch
import transformers
from transformers import PrinterCallback

from lmtuner_core.data.chat_template import ensure_chat_template
from lmtuner_core.data.datasets import split_eval
from lmtuner_core.data.prompt_rows import load_prompt_rows
from lmtuner_core.errors import LmtunerError
from lmtuner_core.graders.scoring import GraderSet
from lmtuner_core.methods import METHODS
from lmtuner_core.paths import AllowedRoots
from lmtuner_core.planning.grpo_memory import VLLM_GPU_SHARE
from lmtuner_core.run import DEEPSPEED_FILE, process_rank
from lmtuner_core.training.model_setup import apply_method, count_parameters, load_base_model, resolve_precision
from lmtuner_core.training.recipe import OPTIMIZERS, ProgressWriter, SFTRecipe, device_arguments

# TRL's names for what GRPO logs -> the names metrics.jsonl and job_status use.
REWARD_KEYS = {"reward": "reward_mean", "reward_std": "reward_std"}


class RewardProgressWriter(ProgressWriter):
    """ProgressWriter whose training records also carry the graders' mean reward and its spread over the answers."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        self._logs = logs or {}
        super().on_log(args, state, control, logs=logs, **kwargs)

    def _append(self, record: dict) -> None:
        if "loss" in record:
            for theirs, ours in REWARD_KEYS.items():
                if self._logs.get(theirs) is not None:
                    record[ours] = round(float(self._logs[theirs]), 6)
        super()._append(record)


def use_vllm(engine: str) -> bool:
    """Whether answers are sampled with vLLM: asked for, or 'auto' on CUDA with vLLM installed."""
    installed = importlib.util.find_spec("vllm") is not None
    if engine == "vllm":
        if not torch.cuda.is_available():
            raise LmtunerError("grpo.engine: 'vllm' samples on a CUDA GPU; use 'transformers' (or 'auto') on the CPU",
                               field="grpo.engine")  # fmt: skip
        if not installed:
            raise LmtunerError("grpo.engine: 'vllm' needs the vllm package (pip install vllm); or use 'transformers'",
                               field="grpo.engine")  # fmt: skip
        return True
    return engine == "auto" and installed and torch.cuda.is_available()


class GRPORecipe:
    __init__ = SFTRecipe.__init__  # the same four things every stage's recipe holds

    # -------------------------------------------------------------------------------------------- setup

    def setup(self) -> None:
        self._check_stop()
        datasets.disable_progress_bars()
        transformers.utils.logging.disable_progress_bar()
        if not self.config.graders:
            raise LmtunerError("graders: stage grpo scores sampled answers with graders; declare at least one, e.g. "
                               "[{'type': 'string_check', 'reference': 'answer', 'operation': 'eq'}]",
                               field="graders")  # fmt: skip
        self.precision, self.compute_dtype = resolve_precision(self.config.precision)
        torch.manual_seed(self.config.seed)
        self._setup_tokenizer()
        self._setup_data()
        self._check_stop()
        self._setup_model()
        self._setup_graders()
        self._check_stop()
        self._setup_trainer()

    _check_stop = SFTRecipe._check_stop

    def _setup_tokenizer(self) -> None:
        SFTRecipe._setup_tokenizer(self)  # type: ignore[arg-type]  # the same loading; prompts need a chat template
        if ensure_chat_template(self.tokenizer):
            print(
                "[lmtuner] the model has no chat template; using ChatML (<|im_start|>role ... <|im_end|>)", flush=True
            )

    def _setup_data(self) -> None:
        self.state.update(phase="reading data")
        loaded = load_prompt_rows(self.config.dataset, AllowedRoots(None), self.config.graders)
        if self.config.eval_dataset is not None:
            train_rows, eval_rows = loaded.rows, []  # held-out prompts are for evaluate (with the same graders)
        else:
            train_rows, eval_rows = split_eval(loaded.rows, self.config.dataset.eval_fraction, self.config.seed)
        self.train_dataset = datasets.Dataset.from_list(train_rows)
        print(
            f"[lmtuner] data: prompts from {loaded.label}; {len(train_rows)} train rows, {len(eval_rows)} held out "
            f"(never trained on), {len(loaded.skipped)} skipped",
            flush=True,
        )
        for reason in loaded.skipped[:20]:
            print(f"[lmtuner] skipped {reason}", flush=True)
        self.state.update(train_rows=len(train_rows), eval_rows=len(eval_rows), skipped_rows=len(loaded.skipped),
                          data_format="prompts")  # fmt: skip

    def _setup_model(self) -> None:
        self.state.update(phase="loading model")
        model = load_base_model(self.config, self.precision, self.compute_dtype)
        self.model = apply_method(model, self.config)
        trainable, total = count_parameters(self.model)
        print(
            f"[lmtuner] model: {self.config.model} ({total / 1e6:.1f}M parameters), method {self.config.method}: "
            f"{trainable / 1e6:.2f}M trainable ({100 * trainable / max(total, 1):.2f}%), precision {self.precision}",
            flush=True,
        )

    def _setup_graders(self) -> None:
        # The file of a python grader was checked inside the roots when the job was submitted (absolute by now).
        self.graders = GraderSet(self.config.graders, AllowedRoots(None), self.config.trust_remote_code)
        described = ", ".join(f"{g.type}×{g.weight:g}" for g in self.config.graders)
        print(f"[lmtuner] reward: weighted mean of graders {described}", flush=True)

    def _setup_trainer(self) -> None:
        from trl import GRPOConfig, GRPOTrainer

        config, settings = self.config, self.config.grpo
        world = process_rank()[2]
        per_step = config.batch_size * config.gradient_accumulation_steps * world
        if per_step % settings.num_generations:
            raise LmtunerError(
                f"grpo.num_generations: batch_size × gradient_accumulation_steps × processes ({per_step}) must be a "
                f"multiple of it ({settings.num_generations}): each prompt's answers are compared within one batch",
                field="grpo.num_generations",
            )
        deepspeed_file = self.run.root / DEEPSPEED_FILE
        deepspeed = str(deepspeed_file) if config.deepspeed is not None else None
        vllm = use_vllm(settings.engine)
        rows = len(self.train_dataset)
        args = GRPOConfig(
            output_dir=str(self.run.checkpoints),
            per_device_train_batch_size=config.batch_size,
            gradient_accumulation_steps=config.gradient_accumulation_steps,
            learning_rate=config.learning_rate,
            num_train_epochs=config.num_epochs,
            max_steps=config.max_steps or -1,
            lr_scheduler_type=config.lr_scheduler,
            warmup_steps=config.warmup_ratio,
            weight_decay=config.weight_decay,
            max_grad_norm=config.max_grad_norm,
            logging_steps=self._logging_steps(rows, per_step),
            logging_first_step=True,
            save_strategy="steps",
            save_steps=config.save_steps,
            save_total_limit=config.save_total_limit,
            seed=config.seed,
            bf16=self.precision == "bf16",
            fp16=self.precision == "fp16",
            **device_arguments(deepspeed),
            gradient_checkpointing=config.gradient_checkpointing,
            report_to=config.report_to or "none",
            optim=METHODS[config.method].optimizer or OPTIMIZERS[config.optimizer],
            disable_tqdm=True,
            dataloader_num_workers=0,
            # GRPO's own settings
            num_generations=settings.num_generations,
            max_completion_length=settings.max_completion_length,
            temperature=settings.temperature,
            beta=settings.beta,
            use_vllm=vllm,
            vllm_mode="colocate",  # in the training process: no second server to start and watch
            vllm_gpu_memory_utilization=VLLM_GPU_SHARE,  # what the memory plan counts (planning/grpo_memory.py)
            remove_unused_columns=False,  # the graders read the rows' reference columns
            log_completions=False,
        )
        self.trainer = GRPOTrainer(
            model=self.model,
            reward_funcs=self.graders.reward_function(),
            args=args,
            train_dataset=self.train_dataset,
            processing_class=self.tokenizer,
            callbacks=[RewardProgressWriter(self.run, self.state, self.stop)],
        )
        self.trainer.remove_callback(PrinterCallback)
        print(
            f"[lmtuner] grpo: {settings.num_generations} answers per prompt of at most "
            f"{settings.max_completion_length} tokens, sampled with {'vLLM (colocated)' if vllm else 'transformers'}; "
            f"beta {settings.beta:g} ({'a reference model' if settings.beta else 'no reference model'})",
            flush=True,
        )

    def _logging_steps(self, rows: int, per_step: int) -> int:
        if self.config.logging_steps:
            return self.config.logging_steps
        prompts_per_step = max(1, per_step // self.config.grpo.num_generations)
        steps = self.config.max_steps or max(1, round(rows * self.config.num_epochs / prompts_per_step))
        return max(1, min(10, steps // 20))

    # -------------------------------------------------------------------------------------------- train / save

    def train(self) -> bool:
        """Runs training; returns True when it was stopped on request (a checkpoint is then saved)."""
        self._check_stop()
        started = time.monotonic()
        self.trainer.train(resume_from_checkpoint=self.config.resume_from)
        print(f"[lmtuner] grpo: trained in {time.monotonic() - started:.0f}s", flush=True)
        return self.stop.is_set()

    save = SFTRecipe.save  # the same artifact: adapter or model, tokenizer, and the marker naming the base
    write_card = SFTRecipe.write_card  # the same model card (README.md), without a result report

    def report(self, job_seconds: float) -> None:
        print("[lmtuner] result report: off for grpo (compare base and tuned with evaluate and the same graders)",
              flush=True)  # fmt: skip
