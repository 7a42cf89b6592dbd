"""LoRA fine-tuning of a Llama / Qwen2 causal LM on FLAN v2, with or without Krause attention.

    torchrun --nproc_per_node 4 -m lora_llms.train --mode krause \\
        --model /models/Meta-Llama-3-8B --data_dir /data/flan_v2 --out_dir runs/krause_llama3_8b

``--mode lora`` is the baseline (LoRA on the pretrained model); ``--mode krause`` first
patches every attention layer with the gated Krause mix (``krause.hf.patch_model``), so LoRA
also adapts the Krause branch's projections while its gate and sigma train in full.
Defaults are the paper's recipe (lr 5e-5, 2 epochs, cosine, warmup 0.1, weight decay 0.01
but never on sigma, bf16, gradient checkpointing, max length 2048, batch 4 x accumulation 8
per GPU). Training runs on transformers' ``Trainer`` (DDP under torchrun; ``--fsdp`` passes
Trainer's FSDP options).

The output directory is a krause.training run directory (``prepare_run_dir``): ``.lock``
(one trainer at a time: a second one is refused in one line), ``config.json`` (the resolved
settings; another config in the same directory is refused), ``launches.jsonl``,
``data_stats.json``, ``metrics.jsonl`` (every Trainer log line, with sigma per layer),
``checkpoints/checkpoint-N`` (Trainer checkpoints, each with ``krause_config.json`` and
``krause_integrity.json``: sizes and CRC-32s), ``adapter/`` (the final adapter, loadable with
``krause.hf.load``, sealed the same way) and ``figures/``. ``--resume`` continues from the
newest complete checkpoint after verifying it (a first launch simply starts). SIGTERM /
SIGUSR1 / Ctrl-C save a checkpoint at the next optimizer step and exit 0.

``--seed`` seeds the process before the model is loaded, so the LoRA matrices and the Krause
gate start from the same values in every run with that seed; the Trainer's data order and
dropout follow from it, and a resumed run continues the uninterrupted one exactly.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
from pathlib import Path

from krause.training.entry import entry_point
from krause.training.errors import UsageError
from lora_llms.config import IGNORED_KEYS, MODES, PRESETS, parse_args  # noqa: F401  (the public names)

log = logging.getLogger("lora_llms.train")


def check_before_writing(args) -> None:
    """What can be refused from the flags and the files alone, before anything is built or written."""
    from krause.training.ranges import check_mapping
    from lora_llms import cli
    from lora_llms.config import build_parser

    config = Path(args.out_dir).expanduser() / "config.json"
    if args.resume and config.is_file():  # a resumed run's saved settings obey today's ranges too
        try:
            saved = json.loads(config.read_text())
        except ValueError as e:
            raise UsageError(f"out_dir: {config} is not JSON ({e}); restore it or start a new out_dir") from None
        check_mapping(saved if isinstance(saved, dict) else {}, build_parser())
    lock = Path(args.out_dir).expanduser() / ".lock"
    if lock.is_file() and int(os.environ.get("RANK", "0")) == 0:  # another trainer: refused now, not after loading
        from krause.training.lock import RunLock

        RunLock(lock).acquire().release()  # the one lock logic (a stale lock is taken over and dropped)
    cli.check_model_dir(args.model)
    cli.check_tokenizer(args.model)
    if args.mode == "krause":
        cli.check_impl(args.impl, cli.resolve_device(None), model_dtype(args), window=args.window)


def _callbacks(metrics, kill_at_step=None):
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


def model_dtype(args) -> str:
    return args.dtype or {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}[args.precision]


def load_model(args):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        args.model, dtype=getattr(torch, model_dtype(args)), attn_implementation=args.attn_implementation
    )
    if args.mode == "krause":
        import krause.hf

        krause.hf.patch_model(model, mix=args.mix, window=args.window, top_k=args.top_k, sigma=args.sigma,
                              impl=args.impl)
    return model


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


@entry_point
def main(argv=None, extra_callbacks=()) -> int:
    """Runs training; ``extra_callbacks`` are added to the Trainer's (tests, custom logging)."""
    args = parse_args(argv)
    check_before_writing(args)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    from transformers import AutoTokenizer

    import krause.hf
    from krause.training.metrics import MetricsLogger
    from krause.training.run_dir import prepare_run_dir
    from krause.training.seed import seed_everything
    from lora_llms import data

    out_dir = Path(args.out_dir).expanduser().resolve()
    ckpt_dir = out_dir / "checkpoints"
    if not args.resume and ckpt_dir.is_dir() and any(ckpt_dir.glob("checkpoint-*")):
        raise UsageError(f"out_dir: {out_dir} already has checkpoints; pass --resume or use a new out_dir")
    resume = resume_point(ckpt_dir) if args.resume and ckpt_dir.is_dir() else None  # verified before any write

    # before anything random is built: the LoRA matrices and the Krause gate are initialised from it
    seed_everything(args.seed)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    data.choose_pad_token(tokenizer)
    train_ds, eval_ds, stats = data.build_datasets(
        args.data_dir, tokenizer, num_train=args.num_train, num_eval=args.num_eval, seed=args.shuffle_seed,
        max_length=args.max_length, num_proc=args.num_proc, label_eos=args.label_eos,
    )
    model = load_model(args)
    limit = getattr(model.config, "max_position_embeddings", None)
    if limit is not None and args.max_length > limit:
        raise UsageError(f"max_length: {args.max_length} is longer than the model allows ({limit} positions)")
    if len(tokenizer) > model.get_input_embeddings().weight.shape[0]:
        model.resize_token_embeddings(len(tokenizer))
    peft_model = krause.hf.lora_model(model, r=args.lora_r, alpha=args.lora_alpha, dropout=args.lora_dropout)
    if args.freeze_sigma:  # the release's sigma never trained (still saved with the adapter)
        for name, param in peft_model.named_parameters():
            if name.endswith("log_sigma"):
                param.requires_grad_(False)
    training_args = _training_args(args, model, ckpt_dir, eval_ds is not None)
    world_size = training_args.world_size  # sets up the process group under torchrun (the run dir broadcasts)

    resolved = {**vars(args), "out_dir": str(out_dir), "world_size": world_size,
                "patch": krause.hf.lora.patch_config_of(model).to_dict() if args.mode == "krause" else None}
    run = prepare_run_dir(out_dir, resolved, resume=False, ignore=IGNORED_KEYS)  # lock; another config refused
    resume_step = int(resume.name.split("-")[-1]) if resume is not None else None
    metrics = MetricsLogger(run.metrics_path, resume_step=resume_step)
    try:
        preempt, krause_cfg_cb, metrics_cb = _callbacks(metrics, args.kill_at_step)
        trainer = build_trainer_class()(
            model=peft_model, args=training_args, train_dataset=train_ds, eval_dataset=eval_ds,
            data_collator=data.collator(tokenizer), processing_class=tokenizer,
            callbacks=[preempt, krause_cfg_cb, metrics_cb, *extra_callbacks],
        )
        if trainer.is_world_process_zero():
            _write_json(out_dir / "data_stats.json", stats)
            peft_model.print_trainable_parameters()
    except BaseException:
        metrics.close()
        run.undo_start()  # nothing trained: the corrected retry must not be refused as another run
        raise
    with metrics:
        trainer.train(resume_from_checkpoint=str(resume) if resume is not None else None)

    if preempt.stopped_at is not None:
        if trainer.is_world_process_zero():
            print(f"stopped by {preempt.handler.reason} at step {preempt.stopped_at}; checkpoint saved, "
                  "run again with --resume", flush=True)
        run.release()
        return 0
    if trainer.is_world_process_zero():
        krause.hf.save(peft_model, out_dir / "adapter")  # sealed: sizes and CRC-32s that the readers check
        _plots(out_dir)
        print(f"adapter saved to {out_dir / 'adapter'}", flush=True)
    run.release()
    return 0


def _training_args(args, model, ckpt_dir: Path, has_eval: bool):
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


def _write_json(path: Path, data) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str) + "\n")
    os.replace(tmp, path)


def _plots(out_dir: Path) -> None:
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


if __name__ == "__main__":
    sys.exit(main())
