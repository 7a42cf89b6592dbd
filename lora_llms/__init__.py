"""Krause-Llama3-8B and Krause-Qwen1.5-7B: LoRA fine-tuning with the gated Krause mix.

Entry points: ``python -m lora_llms.train``, ``python -m lora_llms.evaluate``,
``python -m lora_llms.report``, ``python -m lora_llms.sinks``; tiny stand-in models and
data for smoke runs: ``python -m lora_llms.testing``. See lora_llms/README.md.
"""
