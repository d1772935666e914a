"""The same U-Net as `flmiseg.models.unet`, in PyTorch: an optional side-by-side reference for
`experiments/benchmarks/benchmark.py --torch`. PyTorch is never a dependency of flmiseg; this
module is imported only when it is installed.

Conv3x3(bias)-BN-ReLU twice per stage at widths w, 2w, 4w, 8w, 16w, 2x2 max-pooling, 2x2
stride-2 transposed convolutions, concatenation [skip, upsampled], 1x1 head: 31,042,369
parameters at width 64, as flmiseg's and the reference's.
"""

import torch
from torch import nn


def _double_conv(cin: int, cout: int) -> nn.Sequential:
  return nn.Sequential(
      nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
      nn.Conv2d(cout, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class UNet(nn.Module):
  """U-Net for (N, 1, H, W) inputs with H and W multiples of 16; returns logits (N, 1, H, W)."""

  def __init__(self, width: int = 64, in_channels: int = 1, num_classes: int = 1):
    super().__init__()
    w = width
    self.down = nn.ModuleList(
        [_double_conv(in_channels if i == 0 else w * 2**(i - 1), w * 2**i) for i in range(4)])
    self.bottom = _double_conv(w * 8, w * 16)
    self.up = nn.ModuleList(
        [nn.ConvTranspose2d(w * 2**(i + 1), w * 2**i, 2, stride=2) for i in range(4)])
    self.decode = nn.ModuleList([_double_conv(w * 2**(i + 1), w * 2**i) for i in range(4)])
    self.head = nn.Conv2d(w, num_classes, 1)
    self.pool = nn.MaxPool2d(2)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    skips = []
    for block in self.down:
      x = block(x)
      skips.append(x)
      x = self.pool(x)
    x = self.bottom(x)
    for i in reversed(range(4)):
      x = self.decode[i](torch.cat([skips[i], self.up[i](x)], dim=1))
    return self.head(x)


def count_params(net: nn.Module) -> int:
  return sum(p.numel() for p in net.parameters())
