"""GPT-2-style Krause language models (100M / 200M) trained from scratch on FineWeb-Edu.

    from language_models_100m import build_model
    model = build_model("100m", attention="gated")     # a transformers PreTrainedModel

Importing the package registers ``KrauseLMConfig`` ("krause_lm") and
``KrauseLMForCausalLM`` with ``AutoConfig`` / ``AutoModelForCausalLM``, so saved models
load with ``AutoModelForCausalLM.from_pretrained(path)`` (and lm-eval's HFLM).
Entry points: ``python -m language_models_100m.build_fwe10bt``, ``.train``, ``.evaluate``,
``.params``.
"""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from .model import ATTENTIONS, KrauseLMConfig, KrauseLMForCausalLM, KrauseLMModel
from .presets import PRESETS, build_model, model_config

AutoConfig.register(KrauseLMConfig.model_type, KrauseLMConfig, exist_ok=True)
AutoModel.register(KrauseLMConfig, KrauseLMModel, exist_ok=True)
AutoModelForCausalLM.register(KrauseLMConfig, KrauseLMForCausalLM, exist_ok=True)

__all__ = [
    "ATTENTIONS",
    "PRESETS",
    "KrauseLMConfig",
    "KrauseLMForCausalLM",
    "KrauseLMModel",
    "build_model",
    "model_config",
]
