"""LoRA fine-tuning of a Llama / Qwen2 causal LM on FLAN v2, with or without Krause attention.

    torchrun --nproc_per_node 4 -m lora_llms.train --mode krause \\
        --model /models/Meta-Llama-3-8B --data_dir /data/flan_v2 --out_dir runs/krause_llama3_8b

``--mode lora`` is the baseline (LoRA on the pretrained model); ``--mode krause`` first
patches every attention layer with the gated Krause mix (``krause.hf.patch_model``), so LoRA
also adapts the Krause branch's projections while its gate and sigma train in full.
Defaults are the paper's recipe (lr 5e-5, 2 epochs, cosine, warmup 0.1, weight decay 0.01
but never on sigma, bf16, gradient checkpointing, max length 2048, batch 4 x accumulation 8
per GPU); ``--preset paper`` puts back the first release's choices where they differ (sigma
frozen, EOS not a label; README). The flags and their ranges are in ``lora_llms/config.py``,
checked with the files and the device before anything is loaded or written (bad input: one line,
exit 2); the Trainer's pieces are in ``lora_llms/trainer.py``. Training runs on transformers'
``Trainer`` (DDP under torchrun; ``--fsdp`` passes Trainer's FSDP options).

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

import logging
import sys
from pathlib import Path

from krause.training.entry import entry_point
from krause.training.errors import UsageError
from lora_llms.config import IGNORED_KEYS, MODES, PRESETS, check_before_writing, model_dtype, parse_args  # noqa: F401
from lora_llms.trainer import build_trainer_class, callbacks, plots, resume_point, training_arguments, write_json

log = logging.getLogger("lora_llms.train")


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
    training_args = training_arguments(args, model, ckpt_dir, eval_ds is not None)
    world_size = training_args.world_size  # sets up the process group under torchrun (the run dir broadcasts)

    resolved = {**vars(args), "out_dir": str(out_dir), "world_size": world_size,
                "patch": krause.hf.lora.patch_config_of(model).to_dict() if args.mode == "krause" else None}
    run = prepare_run_dir(out_dir, resolved, resume=False, ignore=IGNORED_KEYS)  # lock; another config refused
    resume_step = int(resume.name.split("-")[-1]) if resume is not None else None
    metrics = MetricsLogger(run.metrics_path, resume_step=resume_step)
    try:
        preempt, krause_cfg_cb, metrics_cb = callbacks(metrics, args.kill_at_step)
        trainer = build_trainer_class()(
            model=peft_model, args=training_args, train_dataset=train_ds, eval_dataset=eval_ds,
            data_collator=data.collator(tokenizer), processing_class=tokenizer,
            callbacks=[preempt, krause_cfg_cb, metrics_cb, *extra_callbacks],
        )
        if trainer.is_world_process_zero():
            write_json(out_dir / "data_stats.json", stats)
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
        plots(out_dir)
        print(f"adapter saved to {out_dir / 'adapter'}", flush=True)
    run.release()
    return 0


if __name__ == "__main__":
    sys.exit(main())
