"""The Trainer side of ``lora_llms.train``: its callbacks (graceful stop on signals, the
checkpoints' ``krause_config.json`` and integrity record, metrics JSON lines with sigma per
layer), the AdamW that never decays sigma, the ``TrainingArguments`` of the recipe, the
verified resume point, and the figures at the end."""

from __future__ import annotations

import json
import logging
import os
import signal
from pathlib import Path

log = logging.getLogger("lora_llms.train")


def callbacks(metrics, kill_at_step=None):
    """Trainer callbacks: graceful stop on signals, krause_config.json and the integrity record in
    checkpoints, metrics JSONL (through krause.training's MetricsLogger)."""
    from transformers import TrainerCallback

    from krause.hf.lora import write_krause_config
    from krause.training import PreemptionHandler
    from krause.training.checkpointer import seal_directory

    class PreemptionCallback(TrainerCallback):
        """Saves a checkpoint at the next optimizer step after SIGTERM / SIGUSR1 / Ctrl-C, then stops."""

        def __init__(self):
            self.handler = PreemptionHandler()
            self.stopped_at = None

        def on_train_begin(self, args, state, control, **kwargs):
            self.handler.install()

        def on_step_end(self, args, state, control, **kwargs):
            if kill_at_step == state.global_step:  # tests: die without any cleanup
                os.kill(os.getpid(), signal.SIGKILL)
            if self.handler.should_stop():
                control.should_save = True
                control.should_training_stop = True
                self.stopped_at = state.global_step
            return control

        def on_train_end(self, args, state, control, **kwargs):
            self.handler.uninstall()

    class KrauseConfigCallback(TrainerCallback):
        def on_save(self, args, state, control, model=None, **kwargs):
            if state.is_world_process_zero and model is not None:
                ckpt = Path(args.output_dir) / f"checkpoint-{state.global_step}"
                if ckpt.is_dir():
                    write_krause_config(model, ckpt)
                    seal_directory(ckpt)  # last: a checkpoint without its seal is an unfinished save

    class MetricsCallback(TrainerCallback):
        """Every Trainer log line (plus sigma per layer) appended to metrics.jsonl on rank 0."""

        def on_log(self, args, state, control, logs=None, model=None, **kwargs):
            if not state.is_world_process_zero or not logs:
                return
            record = {k: v for k, v in logs.items() if k not in ("step", "epoch", "time")}
            sigmas = sigma_per_layer(model) if model is not None else []
            if sigmas:
                record["sigma"] = sigmas
            metrics.log(record, step=state.global_step, epoch=state.epoch)

    return PreemptionCallback(), KrauseConfigCallback(), MetricsCallback()


def sigma_per_layer(model) -> list[float]:
    """Mean sigma over heads for each patched layer (the trained copy under peft)."""
    import torch

    values = []
    for name, param in model.named_parameters():
        if name.endswith("log_sigma") and "original_module" not in name:
            values.append(float(torch.exp(param.detach().float()).mean()))
    return values


def build_trainer_class():
    from transformers import Trainer

    class KrauseTrainer(Trainer):
        """Trainer whose AdamW never decays sigma (the first release decayed it towards 1)."""

        def get_decay_parameter_names(self, model):
            return [n for n in super().get_decay_parameter_names(model) if "log_sigma" not in n]

    return KrauseTrainer


def resume_point(ckpt_dir: Path) -> Path | None:
    """The newest Trainer checkpoint whose save finished (it carries its integrity record), after
    checking its sizes and CRC-32s; None when there is none. An unsealed newer one (a save cut
    short) is passed over; a damaged sealed one is refused in one line naming the older one."""
    from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

    from krause.training.checkpointer import SEAL, verify_sealed
    from krause.training.errors import CorruptCheckpointError

    found = sorted((p for p in ckpt_dir.glob(f"{PREFIX_CHECKPOINT_DIR}-*") if p.is_dir()
                    and p.name.split("-")[-1].isdigit()), key=lambda p: int(p.name.split("-")[-1]))
    sealed = [p for p in found if (p / SEAL).is_file()]
    for skipped in found[found.index(sealed[-1]) + 1:] if sealed else found:
        log.warning("%s has no %s (its save did not finish): not resumed from", skipped, SEAL)
    if not sealed:
        return None
    try:
        verify_sealed(sealed[-1])
    except CorruptCheckpointError as e:
        older = (f"the previous complete checkpoint is {sealed[-2]} (delete the damaged one to resume from it)"
                 if len(sealed) > 1 else "no older complete checkpoint exists")
        raise CorruptCheckpointError(f"{e}; {older}") from None
    return sealed[-1]


def training_arguments(args, model, ckpt_dir: Path, has_eval: bool):
    from transformers import TrainingArguments

    fsdp_config = None
    if args.fsdp:
        layer_cls = type(model.model.layers[0]).__name__
        fsdp_config = {"transformer_layer_cls_to_wrap": [layer_cls], "use_orig_params": True}
    return TrainingArguments(
        output_dir=str(ckpt_dir),
        per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=args.batch_size,
        gradient_accumulation_steps=args.grad_accum,
        learning_rate=args.lr,
        weight_decay=args.weight_decay,
        max_grad_norm=args.grad_clip,
        num_train_epochs=args.epochs,
        max_steps=args.max_steps,
        lr_scheduler_type="cosine",
        warmup_steps=args.warmup_ratio,
        bf16=args.precision == "bf16",
        fp16=args.precision == "fp16",
        activation_checkpointing=not args.no_gradient_checkpointing,
        activation_checkpointing_kwargs={"use_reentrant": False},
        logging_steps=args.logging_steps,
        eval_strategy="steps" if has_eval else "no",
        eval_steps=args.eval_steps,
        save_strategy="steps",
        save_steps=args.save_steps,
        save_total_limit=args.save_total_limit,
        seed=args.seed,
        data_seed=args.seed,
        dataloader_num_workers=args.num_workers,
        remove_unused_columns=False,
        ddp_find_unused_parameters=False,
        fsdp=args.fsdp,
        fsdp_config=fsdp_config,
        report_to="none",
        use_cpu=not _has_accelerator(),
    )


def _has_accelerator() -> bool:
    import torch

    return torch.cuda.is_available()


def write_json(path: Path, data) -> None:
    from krause.training.run_dir import atomic_write_text

    atomic_write_text(path, json.dumps(data, indent=2, default=str) + "\n")


def plots(out_dir: Path) -> None:
    from krause.training.plotting import plot_curves, plot_series

    metrics = out_dir / "metrics.jsonl"
    if not metrics.is_file():
        return
    try:
        plot_curves(metrics, out_dir / "figures" / "curves.png",
                    panels={"loss": ["loss", "eval_loss"], "lr": ["learning_rate"]})
        if any("sigma" in json.loads(line) for line in metrics.read_text().splitlines() if line.strip()):
            plot_series(metrics, out_dir / "figures" / "sigma.png", keys=["sigma"], ylabel="sigma (mean over heads)")
    except ValueError as err:  # too few logged points for a figure
        log.warning("figures skipped: %s", err)
