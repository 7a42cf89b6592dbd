"""Vision transformers with Krause attention: ViT/KViT and Swin/KSwin (docs/recipes.md).

Importing the package registers the models with timm's registry::

    import timm, vision_transformers
    model = timm.create_model("kvit_small_patch4_32", num_classes=10)

Entry points: ``python -m vision_transformers.train`` (training, torchrun-ready),
``python -m vision_transformers.demo`` (KViT vs ViT on the embedded MNIST digits).
"""

from .models import ALIASES, MODEL_DEFAULTS, TWINS, SwinTransformer, VisionTransformer, create, resolve_model_name

__all__ = ["ALIASES", "MODEL_DEFAULTS", "TWINS", "SwinTransformer", "VisionTransformer", "create", "resolve_model_name"]
