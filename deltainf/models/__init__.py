"""Models that take pixel-space [0, 1] input and normalise internally.

Every model built here has three parts that the rest of the library relies on:

* ``model.normalize``  — a :class:`Normalize` module (mean/std buffers), applied first;
* ``model.features(z)`` — normalised images (N, C, H, W) -> penultimate features (N, feature_dim);
* ``model.classifier`` — the final ``nn.Linear`` (feature_dim -> num_classes).

``forward(x) = classifier(features(normalize(x)))``. Detectors that need the last hidden layer
(Activation Clustering, Spectral Signatures) call :func:`penultimate_features`.
"""
from deltainf.models.common import (Normalize, head_inputs, init_weights, penultimate_features,
                                    unwrap_model)
from deltainf.models.factory import MODEL_NAMES, build_model
from deltainf.models.resnet import BasicBlock, ResNet18
from deltainf.models.small_cnn import SmallCNN

__all__ = [
    "Normalize", "SmallCNN", "ResNet18", "BasicBlock", "build_model", "MODEL_NAMES",
    "penultimate_features", "head_inputs", "init_weights", "unwrap_model",
]
