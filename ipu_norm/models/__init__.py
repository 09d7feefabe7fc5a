"""Model zoo: ResNet, EfficientNet (G1/G16), NFNet / NF-ResNet. See registry.py for the model contract."""

from ipu_norm.models.registry import create_model, is_model, list_models, model_family, register_model

__all__ = ["create_model", "is_model", "list_models", "model_family", "register_model"]

# Family modules register their models on import; each is added here when it exists.
from ipu_norm.models import efficientnet, resnet  # noqa: E402,F401,I001
from ipu_norm.models import nfnet  # noqa: E402,F401,I001
