"""SFTRecipe: supervised fine-tuning of a causal LM in one process, on TRL's SFTTrainer.

Supports: methods full, freeze, lora, dora (builders in `model_setup`); chat data with the loss on
assistant turns only (the chat template's {% generation %} markers, or prefix rendering when a template has
none); plain text with the loss on every token; held-out eval loss; checkpoints every `save_steps`;
stopping on SIGTERM with a checkpoint; `metrics.jsonl` and `state.json` for the server to read.
Also qlora / lora-8bit (bitsandbytes base + LoRA) and lomo / adalomo (lomo-optim via the Trainer's `optim`).
RoPE scaling (linear, dynamic, yarn, llama3, ntk, xpos; see `rope`, `xpos`) is written into the model config at load.
Liger kernels when CUDA and liger-kernel are present (`liger`, through SFTConfig.use_liger_kernel).
DeepSpeed ZeRO 0-3 (+ CPU offload) from RUN_DIR/deepspeed.json, and several processes under torchrun (see
`distributed`): every process trains, only global rank 0 writes metrics.jsonl and the final artifacts.

Held-out rows (eval_dataset, or eval_fraction 'auto' of the data) give the held-out loss about 8 times a run; the
result is the checkpoint with the lowest one (keep_best) and training stops when it stops improving
(early_stopping_patience). The result report (lmtuner_core.report) asks the base model its questions in setup() and
the tuned one after save(), in this process, on the model in memory.

Read top to bottom: setup() builds tokenizer → data → model (base answers) → trainer; train(); save(); report().
"""

from __future__ import annotations

import faulthandler
import json
import math
import resource
import sys
import threading
import time
import traceback
from pathlib import Path

import datasets
import torch
import transformers
from transformers import AutoTokenizer, EarlyStoppingCallback, PrinterCallback, TrainerCallback
from trl import SFTConfig, SFTTrainer

from lmtuner_core.config import TrainConfig
from lmtuner_core.data.chat_template import ensure_chat_template
from lmtuner_core.data.datasets import (
    FlatRowsCollator,
    fit_to_length,
    has_generation_markers,
    load_examples,
    split_eval,
    tokenize_cached,
)
from lmtuner_core.errors import LmtunerError, shown
from lmtuner_core.methods import METHODS
from lmtuner_core.paths import AllowedRoots, lmtuner_home
from lmtuner_core.report.result import LossComparison, write_report
from lmtuner_core.run import ARTIFACT_MARKER, DEEPSPEED_FILE, RunDir, StateFile, process_rank, write_json_atomic
from lmtuner_core.training.label_logits import install as install_label_logits
from lmtuner_core.training.model_setup import (
    apply_method,
    count_parameters,
    load_base_model,
    resolve_liger,
    resolve_precision,
)
from lmtuner_core.training.rope import recorded_positions
from lmtuner_core.training.varlen import ATTENTION_NAME as VARLEN_ATTENTION
from lmtuner_core.training.varlen import register as register_varlen
from lmtuner_core.training.varlen import supports_varlen
from lmtuner_core.training.xpos import xpos_parameters

EVALUATIONS_PER_RUN = 8
# TrainConfig.optimizer -> the Trainer's `optim` name.
OPTIMIZERS = {"adamw": "adamw_torch", "adamw-8bit": "adamw_bnb_8bit"}
# Attention implementations that keep the rows of a flattened batch apart: lmtuner's varlen SDPA and flash read the
# row bounds (cu_seq_lens), sdpa/eager a block-diagonal mask built from restarting position ids (transformers'
# masking_utils). Others (remote code, xPos) train on padded batches.
PACKING_ATTENTION = (VARLEN_ATTENTION, "sdpa", "eager", "flash_attention_2", "flash_attention_3")


def peak_memory() -> dict:
    """Peak memory so far, for the dashboard: this process's resident set and, on a GPU, what torch allocated there."""
    memory = {"peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024}  # Linux reports KiB
    if torch.cuda.is_available():
        memory["gpu_peak_mib"] = round(torch.cuda.max_memory_allocated() / 2**20)
    return memory


# What the stages' TRL trainers log, under the names metrics.jsonl and job_status use (TRL name -> ours). The held-out
# versions carry TRL's "eval_" prefix on both sides. A stage adds its trainer's names here.
LOGGED_METRICS = {
    "rewards/margins": "rewards_margin",  # DPO, ORPO, SimPO (CPO), KTO: mean reward(chosen) - reward(rejected)
    "rewards/accuracies": "rewards_accuracy",  # share of pairs with reward(chosen) > reward(rejected)
    "rewards/chosen": "rewards_chosen",
    "rewards/rejected": "rewards_rejected",
    "margin": "rewards_margin",  # RewardTrainer: score(chosen) - score(rejected)
    "accuracy": "rewards_accuracy",
}


class ProgressWriter(TrainerCallback):
    """Writes each logged step to metrics.jsonl, keeps state.json current, and stops on request."""

    def __init__(self, run: RunDir, state: StateFile, stop: threading.Event):
        self.run = run
        self.state = state
        self.stop = stop
        self.started = time.monotonic()
        self.last_time = self.started
        self.last_tokens = 0

    def _append(self, record: dict) -> None:
        with self.run.metrics.open("a", encoding="utf-8") as fh:
            fh.write(json.dumps(record) + "\n")

    def on_train_begin(self, args, state, control, **kwargs):
        self.started = self.last_time = time.monotonic()
        self.last_tokens = state.num_input_tokens_seen or 0
        self.state.update(phase="training", total_steps=state.max_steps, step=state.global_step)

    def on_step_end(self, args, state, control, **kwargs):
        self.state.update(
            force=False, step=state.global_step, epoch=round(state.epoch or 0, 4),
            train_seconds=round(time.monotonic() - self.started, 2),
        )  # fmt: skip
        stop = self._agree_on_stop(args) if args.world_size > 1 else self.stop.is_set()
        if stop:
            if not control.should_training_stop:
                print(f"[lmtuner] stop requested: saving a checkpoint at step {state.global_step}", flush=True)
                # If stopping ever stalls, train.log shows where every thread was (the server kills after its grace).
                faulthandler.dump_traceback_later(15, exit=False, file=sys.stdout)
            control.should_training_stop = True
            control.should_save = True  # what is learned so far survives as a resumable checkpoint
            control.should_evaluate = False  # with save_strategy 'best' an evaluation would decide the save instead

    def _agree_on_stop(self, args) -> bool:
        """Processes get SIGTERM a moment apart: all stop at the same step (the first one that any process saw
        the request), or the others would wait forever in the next step's collective. The answer is the reduced
        flag alone: reading the local flag again after the all_reduce would let a signal landing in between stop
        one process a step before the others (seen: rank 0 in the final all_gather, rank 1 in the next step)."""
        import torch.distributed as dist

        flag = torch.tensor([1.0 if self.stop.is_set() else 0.0], device=args.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        agreed = flag.item() > 0
        if agreed:
            self.stop.set()
        return agreed

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero:
            return  # one metrics.jsonl per job, written by global rank 0
        logs = logs or {}
        now = time.monotonic()
        record: dict = {"step": state.global_step, "epoch": round(state.epoch or 0, 4), "time": round(time.time(), 2)}
        if "loss" in logs:
            tokens = state.num_input_tokens_seen or int(logs.get("num_tokens") or 0)  # TRL's preference trainers
            rate = (tokens - self.last_tokens) / (now - self.last_time) if now > self.last_time else None
            self.last_time, self.last_tokens = now, tokens
            record.update(
                loss=logs["loss"], learning_rate=logs.get("learning_rate"), grad_norm=logs.get("grad_norm"),
                tokens_seen=tokens, tokens_per_second=round(rate, 1) if rate else None, **peak_memory(),
            )  # fmt: skip
        elif "eval_loss" in logs:
            record["eval_loss"] = logs["eval_loss"]
        else:
            return
        prefix = "" if "loss" in logs else "eval_"
        for logged, ours in LOGGED_METRICS.items():
            if logs.get(prefix + logged) is not None:
                record[prefix + ours] = round(float(logs[prefix + logged]), 6)
        self._append(record)
        print(f"[lmtuner] {json.dumps(record)}", flush=True)


def device_arguments(deepspeed: str | None) -> dict:
    """TrainingArguments' device keys, shared by every stage's TRL config: the CPU, DeepSpeed, and gloo for several
    processes on the CPU (naming a backend for one process would start a process group). For DeepSpeed on several
    CPU processes it also sets up accelerate's process-wide distributed state (below), before the config is made."""
    several = process_rank()[2] > 1
    cpu = not torch.cuda.is_available()
    if deepspeed is not None and cpu and several:
        # Written by hand: transformers sets up DeepSpeed's devices without naming a backend, and accelerate then sees
        # one process on a machine without CUDA, so DeepSpeed's "auto" train_batch_size is filled for one process and
        # DeepSpeed refuses it. Setting the distributed state up first, with gloo, as accelerate's own DeepSpeed
        # launch does, and telling TrainingArguments to use it, fills it for all of them.
        import os

        from accelerate import PartialState

        os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"  # as transformers does around its own PartialState
        try:
            PartialState(backend="gloo")
        finally:
            del os.environ["ACCELERATE_USE_DEEPSPEED"]
        return {"use_cpu": False, "deepspeed": deepspeed, "accelerator_config": {"use_configured_state": True}}
    return {
        # With DeepSpeed the accelerator is chosen by DeepSpeed (DS_ACCELERATOR=cpu), not by use_cpu.
        "use_cpu": cpu and deepspeed is None,
        "deepspeed": deepspeed,
        "ddp_backend": "gloo" if cpu and several else None,
    }


class SFTRecipe:
    def __init__(self, config: TrainConfig, run: RunDir, state: StateFile, stop: threading.Event):
        self.config = config
        self.run = run
        self.state = state
        self.stop = stop

    # -------------------------------------------------------------------------------------------- setup

    def setup(self) -> None:
        self._check_stop()
        # train.log is read by people and agents: our own progress lines, not progress bars.
        datasets.disable_progress_bars()
        transformers.utils.logging.disable_progress_bar()
        self.precision, self.compute_dtype = resolve_precision(self.config.precision)
        self.liger, liger_why = resolve_liger(self.config.liger)
        print(f"[lmtuner] liger kernels: {liger_why}", flush=True)
        torch.manual_seed(self.config.seed)
        self._setup_tokenizer()
        self._setup_data()
        self._check_stop()
        self._setup_model()
        self._check_stop()
        self._setup_trainer()

    def _check_stop(self) -> None:
        if self.stop.is_set():
            raise InterruptedError("stopped before training began")

    def _setup_tokenizer(self) -> None:
        self.state.update(phase="loading tokenizer")
        try:
            tokenizer = AutoTokenizer.from_pretrained(
                self.config.model, trust_remote_code=self.config.trust_remote_code
            )
        except (OSError, ValueError) as exc:
            raise LmtunerError(f"model: cannot load the tokenizer of {shown(self.config.model)} ({exc})") from None
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        self.tokenizer = tokenizer

    def _setup_data(self) -> None:
        self.state.update(phase="reading data")
        loaded = load_examples(self.config.dataset, AllowedRoots(None))
        is_chat = loaded.format != "text"
        if is_chat and ensure_chat_template(self.tokenizer):
            print(
                "[lmtuner] the model has no chat template; using ChatML (<|im_start|>role ... <|im_end|>)", flush=True
            )
        if self.config.eval_dataset is not None:
            train_rows = loaded.examples
            eval_rows = load_examples(self.config.eval_dataset, AllowedRoots(None)).examples
            self.held_out_source = f"eval_dataset ({len(eval_rows)} rows)"
        else:
            fraction = self.config.dataset.eval_fraction
            train_rows, eval_rows = split_eval(loaded.examples, fraction, self.config.seed)
            self.held_out_source = (
                f"{len(eval_rows)} of {len(loaded.examples)} dataset rows held out at random (eval_fraction "
                f"{fraction}, seed {self.config.seed})"
            )
        self.held_out_rows = eval_rows
        self.is_chat = is_chat
        self.state.update(phase="tokenizing")
        started = time.monotonic()
        assistant_only = self.config.assistant_only_loss
        cache = lmtuner_home() / "cache" / "tokenized"  # keyed by rows + tokenizer + template (data.py)
        self.train_dataset, hit = tokenize_cached(train_rows, self.tokenizer, cache, assistant_only=assistant_only)
        self.eval_dataset = (
            tokenize_cached(eval_rows, self.tokenizer, cache, assistant_only=assistant_only)[0] if eval_rows else None
        )
        # Cut and drop once, here, so packed and unpacked runs train on exactly the same rows and tokens.
        self.train_dataset, truncated, emptied = fit_to_length(self.train_dataset, self.config.max_seq_len)
        if self.eval_dataset is not None:
            self.eval_dataset = fit_to_length(self.eval_dataset, self.config.max_seq_len)[0]
        if emptied:
            print(
                f"[lmtuner] {emptied} rows left out: nothing to learn within {self.config.max_seq_len} tokens",
                flush=True,
            )
        if len(self.train_dataset) == 0:
            raise LmtunerError(
                "max_seq_len: no row has a token to learn from within it; raise max_seq_len", field="max_seq_len"
            )
        how = "generation markers" if has_generation_markers(self.tokenizer) else "prefix rendering"
        print(
            f"[lmtuner] data: {loaded.format} from {loaded.source.label}; {len(train_rows)} train rows, "
            f"{len(eval_rows)} eval rows, {len(loaded.skipped)} skipped, {truncated} cut at {self.config.max_seq_len} "
            f"tokens; tokenized in {time.monotonic() - started:.1f}s{' (cached)' if hit else ''}"
            + (f"; assistant-only loss via {how}" if is_chat and assistant_only else ""),
            flush=True,
        )
        for reason in loaded.skipped[:20]:
            print(f"[lmtuner] skipped {reason}", flush=True)
        self.state.update(
            train_rows=len(train_rows),
            eval_rows=len(eval_rows),
            skipped_rows=len(loaded.skipped),
            truncated_rows=truncated,
            data_format=loaded.format,
        )

    def _setup_model(self) -> None:
        self.state.update(phase="loading model")
        model = load_base_model(self.config, self.precision, self.compute_dtype)
        model.config.use_cache = False  # the KV cache is for generation; in training it only costs memory
        if self.config.packing and not self.config.trust_remote_code and supports_varlen(model.config):
            # Same results as SDPA, without the (tokens × tokens) mask and cross-row scores (see varlen.py).
            register_varlen()
            model.set_attn_implementation(VARLEN_ATTENTION)
        self.model = apply_method(model, self.config)
        self._setup_report()
        self._add_replay_rows()
        trainable, total = count_parameters(self.model)
        print(
            f"[lmtuner] model: {self.config.model} ({total / 1e6:.1f}M parameters), method {self.config.method}: "
            f"{trainable / 1e6:.2f}M trainable ({100 * trainable / max(total, 1):.2f}%), precision {self.precision}",
            flush=True,
        )

    def _setup_report(self) -> None:
        """Asks the base model the report's questions now, while the model still answers as the base."""
        self.report_runner = None
        self.report_skipped = self._report_skipped()
        if self.report_skipped:
            print(f"[lmtuner] result report: off ({self.report_skipped})", flush=True)
            return
        from lmtuner_core.report.runner import ReportRunner

        self.state.update(phase="asking the base model")
        runner = ReportRunner(
            self.config, self.tokenizer, self.held_out_rows, self.held_out_source, lmtuner_home(), self.stop
        )
        runner.measure_base(self.model)
        print(
            f"[lmtuner] result report: base model answered {len(runner.items)} held-out rows and "
            f"{len(runner.probe)} probe questions in {runner.seconds:.0f}s ({runner.metric})",
            flush=True,
        )
        self.report_runner = runner

    def _add_replay_rows(self) -> None:
        """Self-distillation replay: the base model answers general requests (lmtuner's own, none of the probe's
        facts), and those answers join the training rows, so training on a narrow task does not teach the model to
        answer everything that way. Written here: the libraries have no replay for supervised fine-tuning."""
        settings = self.config.replay
        if settings is None:
            return
        if not self.is_chat:
            raise LmtunerError("replay: plain-text data has no questions to mix answers with; remove replay",
                               field="replay")  # fmt: skip
        from lmtuner_core.data.replay_prompts import load_replay_prompts
        from lmtuner_core.report.runner import base_answers

        self.state.update(phase="asking the base model (replay)")
        started = time.monotonic()
        wanted = round(settings.share * len(self.train_dataset) / (1 - settings.share))
        prompts = load_replay_prompts(self.config.seed, settings.prompts)[:wanted]
        conversations = [[{"role": "user", "content": prompt}] for prompt in prompts]
        answers = base_answers(self.model, self.tokenizer, conversations, settings.max_new_tokens, 16, self.config,
                               lmtuner_home(), self.stop)  # fmt: skip
        pairs = zip(conversations, answers, strict=True)
        rows = [{"messages": [*c, {"role": "assistant", "content": a}]} for c, a in pairs if a]
        cache = lmtuner_home() / "cache" / "tokenized"
        replay = tokenize_cached(rows, self.tokenizer, cache, assistant_only=self.config.assistant_only_loss)[0]
        replay = fit_to_length(replay, self.config.max_seq_len)[0]
        self.train_dataset = datasets.concatenate_datasets([self.train_dataset, replay])
        print(f"[lmtuner] replay: {len(replay)} rows of the base model's own answers ({settings.prompts}) mixed in "
              f"(share {settings.share}; {time.monotonic() - started:.0f}s)", flush=True)  # fmt: skip
        self.state.update(replay_rows=len(replay))

    def _report_skipped(self) -> str | None:
        """Why this job writes no report, or None when it does."""
        if not self.config.report.enabled:
            return "report: false"
        if process_rank()[2] > 1 or self.config.deepspeed is not None:
            return "several processes or DeepSpeed: run evaluate on the output instead"
        if not self.is_chat:
            return "plain-text data has no answers to compare; the held-out loss is in metrics.jsonl"
        if not self.held_out_rows:
            return "no held-out rows: give an eval_dataset, or more rows so that eval_fraction 'auto' holds some out"
        return None

    def _total_steps(self, rows: int) -> int:
        world = process_rank()[2]
        per_epoch = max(1, math.ceil(rows / (self.config.batch_size * self.config.gradient_accumulation_steps * world)))
        return self.config.max_steps or max(1, math.ceil(per_epoch * self.config.num_epochs))

    def _logging_steps(self, rows: int) -> int:
        if self.config.logging_steps:
            return self.config.logging_steps
        return max(1, min(10, self._total_steps(rows) // 20))

    def _eval_steps(self, rows: int) -> int:
        """About EVALUATIONS_PER_RUN held-out evaluations: enough to find the best step and to stop early."""
        return self.config.eval_steps or max(1, round(self._total_steps(rows) / EVALUATIONS_PER_RUN))

    def _trainer_arguments(self) -> dict:
        """The TrainingArguments every stage's TRL config shares (steps, schedule, held-out checks, checkpoints,
        precision, devices, DeepSpeed); a stage adds its own keys (`_setup_trainer`)."""
        config = self.config
        has_eval = self.eval_dataset is not None
        keep_best = has_eval and config.keep_best
        deepspeed_file = self.run.root / DEEPSPEED_FILE
        deepspeed = str(deepspeed_file) if config.deepspeed is not None else None
        if deepspeed is not None and not deepspeed_file.is_file():
            raise LmtunerError(f"deepspeed: {deepspeed_file} is missing; start the job again", field="deepspeed")
        return dict(
            output_dir=str(self.run.checkpoints),
            per_device_train_batch_size=config.batch_size,
            per_device_eval_batch_size=config.batch_size,
            gradient_accumulation_steps=config.gradient_accumulation_steps,
            learning_rate=config.learning_rate,
            num_train_epochs=config.num_epochs,
            max_steps=config.max_steps or -1,
            lr_scheduler_type=config.lr_scheduler,
            warmup_steps=config.warmup_ratio,  # a float below 1 is a share of the total steps
            weight_decay=config.weight_decay,
            max_grad_norm=config.max_grad_norm,
            logging_steps=self._logging_steps(len(self.train_dataset)),
            logging_first_step=True,
            # keep_best: a checkpoint is written when the held-out loss improves, and the best one is the result.
            save_strategy="best" if keep_best else "steps",
            save_steps=config.save_steps,
            save_total_limit=config.save_total_limit,
            eval_strategy="steps" if has_eval else "no",
            eval_steps=self._eval_steps(len(self.train_dataset)) if has_eval else None,
            metric_for_best_model="eval_loss" if has_eval else None,
            greater_is_better=False,
            load_best_model_at_end=keep_best,
            seed=config.seed,
            bf16=self.precision == "bf16",
            fp16=self.precision == "fp16",
            **device_arguments(deepspeed),
            activation_checkpointing=config.gradient_checkpointing,  # transformers 5.2x: the old name warns
            report_to=config.report_to or "none",
            optim=METHODS[config.method].optimizer or OPTIMIZERS[config.optimizer],
            disable_tqdm=True,
            dataloader_num_workers=0,
            save_only_model=False,
        )

    def _build_trainer(self, trainer_class: type, args) -> None:
        """The stage's TRL trainer on the pieces every stage shares: the model, the rows, the tokenizer, one progress
        line per logged step, and early stopping (`_finish_trainer`)."""
        self.trainer = trainer_class(
            model=self.model,
            args=args,
            train_dataset=self.train_dataset,
            eval_dataset=self.eval_dataset,
            processing_class=self.tokenizer,
            callbacks=[ProgressWriter(self.run, self.state, self.stop)],
        )
        self._finish_trainer()

    def _finish_trainer(self) -> None:
        """What every stage's trainer gets: early stopping on the held-out loss, and one JSON line per logged step."""
        if self.eval_dataset is not None and self.config.early_stopping_patience:
            patience = self.config.early_stopping_patience
            self.trainer.add_callback(EarlyStoppingCallback(early_stopping_patience=patience))
        self.trainer.remove_callback(PrinterCallback)  # ProgressWriter logs each step as one JSON line

    def _setup_trainer(self) -> None:
        config = self.config
        args = SFTConfig(
            **self._trainer_arguments(),
            use_liger_kernel=self.liger,
            max_length=config.max_seq_len,
            packing=False,  # rows are flattened per batch by FlatRowsCollator, not packed into fixed-length sequences
            # Packing off: rows of similar length share a batch, so less padding is computed.
            train_sampling_strategy="group_by_length" if config.group_by_length and not self.packing else "random",
            # A flattened batch has no padding at all (and a pad token may double as end of turn): count every token.
            include_num_input_tokens_seen="all" if self.packing else "non_padding",
        )
        self._build_trainer(SFTTrainer, args)
        if self.packing:
            self.trainer.data_collator = FlatRowsCollator()
            if not torch.cuda.is_available():
                install_label_logits(self.trainer.model)  # TRL's fused head off CUDA scores every position, slowly

    @property
    def packing(self) -> bool:
        """Padding-free batches where they are exact: attention that keeps flattened rows apart."""
        attention = getattr(self.model.config, "_attn_implementation", None)
        return self.config.packing and not self.config.trust_remote_code and attention in PACKING_ATTENTION

    # -------------------------------------------------------------------------------------------- train / save

    def train(self) -> bool:
        """Runs training; returns True when it was stopped on request (a checkpoint is then saved)."""
        self._check_stop()
        resume = self.config.resume_from
        self.base_eval_loss = None
        if self.eval_dataset is not None and not resume:
            self.state.update(phase="held-out loss of the base model")
            self.base_eval_loss = self.trainer.evaluate()["eval_loss"]  # logged at step 0 beside the curve
        self.trainer.train(resume_from_checkpoint=resume)
        return self.stop.is_set()

    def held_out_loss(self) -> LossComparison:
        state = self.trainer.state
        return LossComparison(
            base=self.base_eval_loss, best=state.best_metric, best_step=state.best_global_step,
            final_step=state.global_step,
            stopped_early=bool(state.max_steps and state.global_step < state.max_steps and not self.stop.is_set()),
        )  # fmt: skip

    def report(self, job_seconds: float) -> None:
        """Writes report.json: the tuned model's answers beside the base's, scored, with the retention check."""
        if self.report_runner is None or not self.trainer.is_world_process_zero():
            return
        self.state.update(phase="writing the result report")
        try:
            report = self.report_runner.build(self.trainer.model, self.held_out_loss(), job_seconds)
        except InterruptedError:
            print("[lmtuner] result report: stopped on request; the trained model is saved", flush=True)
            return
        except Exception:  # the model is saved: a report that fails must not fail the job
            traceback.print_exc()
            self.state.update(report_error="the result report failed (traceback in train.log); the model is saved")
            return
        write_report(self.run.root, report)
        retention = report.retention
        kept = f"; kept {retention.kept} of {retention.known} probe facts" if retention else ""
        print(f"[lmtuner] result report ({report.seconds:.0f}s): {report.metric} {report.base} -> {report.tuned} on "
              f"{report.held_out_rows} held-out rows{kept}: {report.verdict}", flush=True)  # fmt: skip

    def write_card(self, job_seconds: float) -> None:
        """Writes README.md, the Hugging Face model card, beside the saved model: how it was trained, the result
        report's scores, limitations and how to run it. A card that fails must not fail the job."""
        if not self.trainer.is_world_process_zero():
            return
        from lmtuner_core.report.model_card import model_card, write_model_card
        from lmtuner_core.report.result import read_report

        try:
            config = json.loads(self.run.config.read_text(encoding="utf-8"))
            text = model_card(config, read_report(self.run.root), adapter=METHODS[self.config.method].adapter,
                              job_seconds=job_seconds)  # fmt: skip
            write_model_card(Path(self.config.output_dir or self.run.default_output), text)
        except Exception:
            traceback.print_exc()
            print("[lmtuner] the model card (README.md) was not written; the model is saved", flush=True)

    def save(self) -> None:
        """Writes the adapter (LoRA family) or the full model, with the tokenizer, in Hugging Face layout."""
        self.state.update(phase="saving")
        output = Path(self.config.output_dir or self.run.default_output)
        output.mkdir(parents=True, exist_ok=True)
        self.trainer.save_model(str(output))  # every process: ZeRO-3 gathers the partitioned weights
        if not self.trainer.is_world_process_zero():
            return
        self.tokenizer.save_pretrained(str(output))
        artifact = {
            "base_model": self.config.model,
            "method": self.config.method,
            "stage": self.config.stage,  # a reward model loads as a sequence classifier (evaluate, generate)
            "adapter": METHODS[self.config.method].adapter,
            "job_run_dir": str(self.run.root),
        }
        base_config = self.trainer.model.config
        if self.config.rope_scaling is not None or xpos_parameters(base_config):
            # An adapter does not carry the base model's config: record the positions it was trained with.
            artifact.update(recorded_positions(base_config))
        write_json_atomic(output / ARTIFACT_MARKER, artifact, indent=2)
