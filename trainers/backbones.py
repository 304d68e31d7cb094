"""Face-recognition backbones: images [B, 3, H, W] in, un-normalised embeddings [B, D] out.

The margin heads (and MagFace / AdaFace, which read the feature norm) need the raw embedding,
so no backbone here normalises its output; :class:`EmbeddingModel` is the exported wrapper that
does. Every backbone takes ``input_size`` and sizes its flatten/GDC layer from it, so 112x112,
96x96, 64x64 and 32x32 faces all work. Nothing here touches a device: move models yourself.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from marginsearch.losses.errors import MarginsearchError

from .images import Preprocess

__all__ = [
    "BACKBONES",
    "EmbeddingModel",
    "IBasicBlock",
    "IResNet",
    "MobileFaceNet",
    "TinyCNN",
    "build_backbone",
    "iresnet18",
    "iresnet34",
    "iresnet50",
    "iresnet100",
]

Size = tuple[int, int]


def _as_size(input_size: int | Size) -> Size:
    """Normalise an ``int`` or ``(H, W)`` input size to a validated ``(H, W)`` tuple."""
    if isinstance(input_size, int):
        input_size = (input_size, input_size)
    h, w = (int(s) for s in input_size)
    if h < 1 or w < 1:
        raise ValueError(f"input_size must be positive, got {input_size!r}")
    return h, w


def _downsampled(input_size: Size, halvings: int) -> Size:
    """Feature-map size after ``halvings`` stride-2 convs (3x3 pad 1 or 1x1 pad 0: ceil(n / 2))."""
    h, w = input_size
    for _ in range(halvings):
        h, w = (h + 1) // 2, (w + 1) // 2
    return h, w


def _conv_bn_prelu(cin: int, cout: int, kernel: int = 3, stride: int = 1, groups: int = 1) -> nn.Sequential:
    """Conv (no bias) -> BatchNorm2d -> per-channel PReLU, the unit of MobileFaceNet and TinyCNN."""
    return nn.Sequential(
        nn.Conv2d(cin, cout, kernel, stride, padding=kernel // 2, groups=groups, bias=False),
        nn.BatchNorm2d(cout),
        nn.PReLU(cout),
    )


class TinyCNN(nn.Module):
    """Small fast proxy: 4 stride-2 conv-BN-PReLU stages -> flatten -> linear -> BatchNorm1d."""

    def __init__(self, embedding_size: int = 128, width: int = 32, input_size: int | Size = (32, 32)) -> None:
        super().__init__()
        size = _as_size(input_size)
        chans = [3, width, 2 * width, 4 * width, 8 * width]
        self.stages = nn.Sequential(*(_conv_bn_prelu(chans[i], chans[i + 1], 3, 2) for i in range(4)))
        h, w = _downsampled(size, 4)
        self.fc = nn.Linear(chans[-1] * h * w, embedding_size, bias=False)
        self.features = nn.BatchNorm1d(embedding_size)
        self.embedding_size = embedding_size
        self.input_size = size

    def forward(self, x: Tensor) -> Tensor:
        """Images [B, 3, H, W] -> embeddings [B, embedding_size]."""
        return self.features(self.fc(torch.flatten(self.stages(x), 1)))


class _Bottleneck(nn.Module):
    """MobileNetV2 inverted residual with PReLU, as used by MobileFaceNet (arXiv 1801.04381)."""

    def __init__(self, cin: int, cout: int, stride: int, expansion: int) -> None:
        super().__init__()
        hidden = cin * expansion
        self.use_residual = stride == 1 and cin == cout
        self.block = nn.Sequential(
            _conv_bn_prelu(cin, hidden, 1),
            _conv_bn_prelu(hidden, hidden, 3, stride, groups=hidden),
            nn.Conv2d(hidden, cout, 1, bias=False),  # linear projection: no activation
            nn.BatchNorm2d(cout),
        )

    def forward(self, x: Tensor) -> Tensor:
        """Inverted residual: add the input back when shapes match."""
        out = self.block(x)
        if self.use_residual:
            out = out + x
        return out


class MobileFaceNet(nn.Module):
    """MobileFaceNet (Chen et al., arXiv 1804.07573): bottlenecks + global depthwise conv (GDC)."""

    # [expansion t, channels c, repeats n, stride s] of the paper's Table 1
    SETTINGS: tuple[tuple[int, int, int, int], ...] = (
        (2, 64, 5, 2),
        (4, 128, 1, 2),
        (2, 128, 6, 1),
        (4, 128, 1, 2),
        (2, 128, 2, 1),
    )

    def __init__(self, embedding_size: int = 512, input_size: int | Size = (112, 112)) -> None:
        super().__init__()
        size = _as_size(input_size)
        self.conv1 = _conv_bn_prelu(3, 64, 3, 2)
        self.conv2_dw = _conv_bn_prelu(64, 64, 3, 1, groups=64)
        blocks: list[nn.Module] = []
        cin = 64
        for t, c, n, s in self.SETTINGS:
            for i in range(n):
                blocks.append(_Bottleneck(cin, c, s if i == 0 else 1, t))
                cin = c
        self.blocks = nn.Sequential(*blocks)
        self.conv_sep = _conv_bn_prelu(cin, 512, 1)
        h, w = _downsampled(size, 1 + sum(1 for t, c, n, s in self.SETTINGS if s == 2))
        # linear GDC: a depthwise conv whose kernel covers the whole final feature map
        self.gdc = nn.Sequential(nn.Conv2d(512, 512, (h, w), groups=512, bias=False), nn.BatchNorm2d(512))
        self.linear = nn.Linear(512, embedding_size, bias=False)  # == linear conv1x1 on a 1x1 map
        self.features = nn.BatchNorm1d(embedding_size)
        self.embedding_size = embedding_size
        self.input_size = size
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")

    def forward(self, x: Tensor) -> Tensor:
        """Images [B, 3, H, W] -> embeddings [B, embedding_size]."""
        x = self.conv_sep(self.blocks(self.conv2_dw(self.conv1(x))))
        x = torch.flatten(self.gdc(x), 1)
        return self.features(self.linear(x))


class IBasicBlock(nn.Module):
    """Improved-residual basic block, BN-conv-BN-PReLU-conv-BN (Duta et al., arXiv 2004.04989)."""

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(inplanes, eps=1e-05)
        self.conv1 = nn.Conv2d(inplanes, planes, 3, 1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes, eps=1e-05)
        self.prelu = nn.PReLU(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes, eps=1e-05)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: Tensor) -> Tensor:
        """Residual branch plus (possibly downsampled) identity."""
        out = self.bn3(self.conv2(self.prelu(self.bn2(self.conv1(self.bn1(x))))))
        identity = x if self.downsample is None else self.downsample(x)
        return out + identity


class IResNet(nn.Module):
    """ArcFace's IResNet (Deng et al., arXiv 1801.07698), insightface arcface_torch layout and names."""

    def __init__(
        self,
        layers: list[int],
        embedding_size: int = 512,
        input_size: int | Size = (112, 112),
        dropout: float = 0.0,
        zero_init_residual: bool = False,
    ) -> None:
        super().__init__()
        if len(layers) != 4:
            raise ValueError(f"layers must have 4 entries, got {layers!r}")
        size = _as_size(input_size)
        self.inplanes = 64
        self.conv1 = nn.Conv2d(3, 64, 3, 1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(64, eps=1e-05)
        self.prelu = nn.PReLU(64)
        self.layer1 = self._make_layer(64, layers[0], stride=2)
        self.layer2 = self._make_layer(128, layers[1], stride=2)
        self.layer3 = self._make_layer(256, layers[2], stride=2)
        self.layer4 = self._make_layer(512, layers[3], stride=2)
        self.bn2 = nn.BatchNorm2d(512, eps=1e-05)
        self.dropout = nn.Dropout(p=dropout)
        h, w = _downsampled(size, 4)
        self.fc = nn.Linear(512 * h * w, embedding_size)
        self.features = nn.BatchNorm1d(embedding_size, eps=1e-05)
        self.embedding_size = embedding_size
        self.input_size = size
        # insightface's init: N(0, 0.1) convs, unit BN, and a frozen unit scale on `features`
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0, 0.1)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)
        nn.init.constant_(self.features.weight, 1.0)
        self.features.weight.requires_grad = False
        if zero_init_residual:
            for m in self.modules():
                if isinstance(m, IBasicBlock):
                    nn.init.constant_(m.bn2.weight, 0)

    def _make_layer(self, planes: int, blocks: int, stride: int) -> nn.Sequential:
        """One stage: a (downsampling) first block then ``blocks - 1`` identity blocks."""
        downsample = None
        if stride != 1 or self.inplanes != planes:
            downsample = nn.Sequential(
                nn.Conv2d(self.inplanes, planes, 1, stride, bias=False),
                nn.BatchNorm2d(planes, eps=1e-05),
            )
        stage: list[nn.Module] = [IBasicBlock(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes
        stage.extend(IBasicBlock(planes, planes) for _ in range(1, blocks))
        return nn.Sequential(*stage)

    def forward(self, x: Tensor) -> Tensor:
        """Images [B, 3, H, W] -> embeddings [B, embedding_size]."""
        x = self.prelu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        x = torch.flatten(self.bn2(x), 1)
        x = self.dropout(x)
        return self.features(self.fc(x))


def iresnet18(embedding_size: int = 512, input_size: int | Size = (112, 112), dropout: float = 0.0) -> IResNet:
    """IResNet-18, layers [2, 2, 2, 2] (insightface r18)."""
    return IResNet([2, 2, 2, 2], embedding_size, input_size, dropout)


def iresnet34(embedding_size: int = 512, input_size: int | Size = (112, 112), dropout: float = 0.0) -> IResNet:
    """IResNet-34, layers [3, 4, 6, 3] (insightface r34)."""
    return IResNet([3, 4, 6, 3], embedding_size, input_size, dropout)


def iresnet50(embedding_size: int = 512, input_size: int | Size = (112, 112), dropout: float = 0.0) -> IResNet:
    """IResNet-50, layers [3, 4, 14, 3] (insightface r50)."""
    return IResNet([3, 4, 14, 3], embedding_size, input_size, dropout)


def iresnet100(embedding_size: int = 512, input_size: int | Size = (112, 112), dropout: float = 0.0) -> IResNet:
    """IResNet-100, layers [3, 13, 30, 3] (insightface r100)."""
    return IResNet([3, 13, 30, 3], embedding_size, input_size, dropout)


BACKBONES: dict[str, Callable[..., nn.Module]] = {
    "tiny": TinyCNN,
    "mobilefacenet": MobileFaceNet,
    "iresnet18": iresnet18,
    "iresnet34": iresnet34,
    "iresnet50": iresnet50,
    "iresnet100": iresnet100,
}


def build_backbone(name: str, embedding_size: int, input_size: int | Size, **kwargs) -> nn.Module:
    """Build the backbone registered as ``name`` in :data:`BACKBONES`."""
    try:
        factory = BACKBONES[name]
    except KeyError:
        raise MarginsearchError(f"unknown backbone {name!r}; choose one of {sorted(BACKBONES)}") from None
    return factory(embedding_size=embedding_size, input_size=input_size, **kwargs)


class EmbeddingModel(nn.Module):
    """Export wrapper: images -> L2-normalised embeddings (cosine scores are dot products), with the `Preprocess`
    that prepares its images (None: its backbone's input size, stretched)."""

    def __init__(self, backbone: nn.Module, preprocess: Preprocess | None = None) -> None:
        super().__init__()
        self.backbone = backbone
        self.preprocess = preprocess  # a plain attribute: not in the state dict, recorded by every model file

    def forward(self, images: Tensor) -> Tensor:
        """Images [B, 3, H, W] -> unit-norm embeddings [B, D]."""
        return F.normalize(self.backbone(images), p=2.0, dim=1)
