"""Winograd convolution F(m x m, 3x3) for 3x3 stride-1 convs: dense, grouped and depthwise.

Lavin and Gray (2016) compute an m x m output tile of a 3x3 convolution from an (m+2) x (m+2)
input tile d with ``Y = A^T [(G g G^T) * (B^T d B)] A``: the kernel g and the tile are taken to a
transform domain where the convolution is an elementwise product, summed over input channels.
For m = 2 that is 16 products per tile and channel pair instead of 36; for m = 4 (``tile=4``), 36
instead of 144. The transforms are not free, and this block says what it really does:

* F(2x2,3x3) (``tile=2``, the default): B^T and A^T hold only 0 and +-1, so both transforms are
  additions of tensor slices (no multiplication at all). B^T d B runs on strided slices of the
  whole image: the row step once per tile row (overlapping tiles share it, 4 additions per tile
  row and padded column), the column step per tile (16); A^T M A is 24 additions per tile and
  output channel (16 + 8). Its MACs are the products alone; the additions are reported apart
  (``additions_breakdown``).
* F(4x4,3x3) (``tile=4``): B^T and A^T hold 2, 4, 5 and 8, so the transforms stay matrix products,
  counted as MACs: ``kron(B^T, B^T)`` (a*a, a*a) times the tiles, a^4 MACs per tile and input
  channel (a = m + 2), and ``kron(A^T, A^T)`` (m*m, a*a) times the products, m^2 a^2 per tile and
  output channel.
* products: one batched matmul per transform position (grouped: per group; depthwise: an
  elementwise product): a^2 x (Cin / groups) x Cout MACs per tile;
* filter transform ``G g G^T``: once per weight value (cached while the weight does not change and
  no gradient is wanted), not per call.

``count_macs`` declares these counts to convrewrite's MAC counter, which otherwise would see the
matmuls but not the elementwise products of the depthwise case. The weight is stored as the
ordinary 3x3 kernel (same ``weight`` and ``bias`` as the conv it replaces), so the state_dict
reads like a conv, fine-tuning trains the usual kernel and ``to_dense()`` is the conv's kernel.
Padding (any ``padding_mode``) is applied first; the output is then padded up to whole tiles with
zeros and cropped back. This file depends on torch alone: ``convrewrite apply`` copies it into
generated ``model.py``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

#: Lavin & Gray's matrices for F(2x2,3x3) and F(4x4,3x3): input B^T, filter G, output A^T.
WINOGRAD_MATRICES: dict[int, tuple[list[list[float]], list[list[float]], list[list[float]]]] = {
    2: (
        [[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]],
        [[1, 0, 0], [0.5, 0.5, 0.5], [0.5, -0.5, 0.5], [0, 0, 1]],
        [[1, 1, 1, 0], [0, 1, -1, -1]],
    ),
    4: (
        [
            [4, 0, -5, 0, 1, 0],
            [0, -4, -4, 1, 1, 0],
            [0, 4, -4, -1, 1, 0],
            [0, -2, -1, 2, 1, 0],
            [0, 2, -1, -2, 1, 0],
            [0, 4, 0, -5, 0, 1],
        ],
        [
            [1 / 4, 0, 0],
            [-1 / 6, -1 / 6, -1 / 6],
            [-1 / 6, 1 / 6, -1 / 6],
            [1 / 24, 1 / 12, 1 / 6],
            [1 / 24, -1 / 12, 1 / 6],
            [0, 0, 1],
        ],
        [[1, 1, 1, 1, 1, 0], [0, 1, -1, 2, -2, 0], [0, 1, 1, 4, 4, 0], [0, 1, -1, 8, -8, 1]],
    ),
}

_PADDING_MODES = {"zeros": "constant", "reflect": "reflect", "replicate": "replicate", "circular": "circular"}


def _pair(value) -> tuple[int, int]:
    if isinstance(value, (tuple, list)):
        first, second = value
        return int(first), int(second)
    return int(value), int(value)


def _in_graph_capture() -> bool:
    """True while torch.jit.trace, torch.export or torch.compile records the forward."""
    if torch.jit.is_tracing():
        return True
    compiler = getattr(torch, "compiler", None)
    for check in ("is_exporting", "is_compiling"):
        probe = getattr(compiler, check, None)
        if probe is not None and probe():
            return True
    return False


_TRANSFORMS: dict[tuple[int, torch.dtype, torch.device], tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}


def winograd_transforms(tile: int, dtype: torch.dtype, device: torch.device) -> tuple[torch.Tensor, ...]:
    """(kron(B^T, B^T), G, kron(A^T, A^T)) in ``dtype``, rounded once from float64 (1/6 and 1/24
    have no exact binary form), built once per tile, dtype and device."""
    key = (tile, dtype, device)
    capturing = _in_graph_capture()
    if capturing or key not in _TRANSFORMS:
        input_t, filter_t, output_t = (torch.tensor(m, dtype=torch.float64) for m in WINOGRAD_MATRICES[tile])
        built = tuple(
            t.to(device=device, dtype=dtype)
            for t in (torch.kron(input_t, input_t), filter_t, torch.kron(output_t, output_t))
        )
        if capturing:
            # Tensors made while torch.export / torch.compile records are fake: never cache them.
            return built
        _TRANSFORMS[key] = built  # type: ignore[assignment]
    return _TRANSFORMS[key]


class WinogradConv2d(nn.Module):
    """A 3x3, stride-1, dilation-1 ``nn.Conv2d`` computed with Winograd's F(tile x tile, 3x3)."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size=3,
        padding=0,
        groups: int = 1,
        bias: bool = True,
        padding_mode: str = "zeros",
        tile: int = 2,
    ) -> None:
        super().__init__()
        if _pair(kernel_size) != (3, 3):
            raise ValueError(f"WinogradConv2d computes 3x3 convs only, got kernel_size={kernel_size}")
        if tile not in WINOGRAD_MATRICES:
            raise ValueError(f"tile must be one of {sorted(WINOGRAD_MATRICES)}, got {tile}")
        if in_channels % groups or out_channels % groups:
            raise ValueError(f"in_channels and out_channels must be divisible by groups={groups}")
        if padding_mode not in _PADDING_MODES:
            raise ValueError(f"padding_mode must be one of {sorted(_PADDING_MODES)}, got {padding_mode!r}")
        if padding == "same":
            padding = 1
        elif padding == "valid":
            padding = 0
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.kernel_size = (3, 3)
        self.stride = (1, 1)
        self.dilation = (1, 1)
        self.padding = _pair(padding)
        self.groups = groups
        self.padding_mode = padding_mode
        self.tile = tile
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels // groups, 3, 3))
        self.bias = nn.Parameter(torch.empty(out_channels)) if bias else None
        # Initialized like nn.Conv2d, so a fresh build_model() trains like the conv it stands for.
        nn.init.kaiming_uniform_(self.weight, a=5**0.5)
        if self.bias is not None:
            bound = 1.0 / (in_channels // groups * 9) ** 0.5
            nn.init.uniform_(self.bias, -bound, bound)
        self._cached_weight: tuple[tuple, torch.Tensor] | None = None

    def extra_repr(self) -> str:
        text = f"{self.in_channels}, {self.out_channels}, tile={self.tile}, padding={self.padding}"
        if self.groups != 1:
            text += f", groups={self.groups}"
        if self.bias is None:
            text += ", bias=False"
        if self.padding_mode != "zeros":
            text += f", padding_mode={self.padding_mode!r}"
        return text

    # ------------------------------------------------------------------ weights

    def transformed_weight(self) -> torch.Tensor:
        """``G g G^T`` for every kernel, as (a*a, out_channels, in_channels / groups)."""
        size = self.tile + 2
        _, g, _ = winograd_transforms(self.tile, self.weight.dtype, self.weight.device)
        product = torch.einsum("ik,ockl,jl->ijoc", g, self.weight, g)
        return product.reshape(size * size, self.out_channels, self.in_channels // self.groups)

    def _weight_in_transform_domain(self) -> torch.Tensor:
        weight = self.weight
        if (torch.is_grad_enabled() and weight.requires_grad) or _in_graph_capture():
            return self.transformed_weight()
        key = (weight.data_ptr(), weight._version, weight.dtype, weight.device)
        cached = self._cached_weight
        if cached is None or cached[0] != key:
            with torch.no_grad():
                cached = (key, self.transformed_weight())
            self._cached_weight = cached
        return cached[1]

    def to_dense(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The equivalent dense (weight, bias): the 3x3 kernel itself, groups expanded."""
        from convrewrite.layers.dense import conv_dense_kernel

        return conv_dense_kernel(self)

    # ------------------------------------------------------------------ geometry and cost

    def tiles_for(self, height: int, width: int) -> tuple[int, int, int, int]:
        """(output height, output width, tile rows, tile columns) for an input of that size."""
        out_h = height + 2 * self.padding[0] - 2
        out_w = width + 2 * self.padding[1] - 2
        return out_h, out_w, -(-out_h // self.tile), -(-out_w // self.tile)

    def macs_breakdown(self, batch: int, height: int, width: int) -> dict[str, int]:
        """MACs of one call on a (batch, in_channels, height, width) input, by kind."""
        m, a = self.tile, self.tile + 2
        _, _, rows, columns = self.tiles_for(height, width)
        tiles = batch * rows * columns
        macs = {"winograd_product": tiles * a * a * (self.in_channels // self.groups) * self.out_channels}
        if m != 2:  # F(2x2,3x3)'s transforms are additions (additions_breakdown)
            macs["winograd_input_transform"] = tiles * self.in_channels * a**4
            macs["winograd_output_transform"] = tiles * self.out_channels * m * m * a * a
        return macs

    def additions_breakdown(self, batch: int, height: int, width: int) -> dict[str, int]:
        """Additions (and subtractions) of one call that are not part of a MAC, by kind: the
        F(2x2,3x3) transforms. Input, per input channel and image: 4 per tile row and padded image
        column (the row step, 2 columns + 2 of them) plus 16 per tile (the column step); output,
        per output channel: 24 per tile (16 + 8). Summing the products over input channels is
        counted in the MACs; the bias is not counted."""
        if self.tile != 2:
            return {}
        _, _, rows, columns = self.tiles_for(height, width)
        tiles = batch * rows * columns
        return {
            "winograd_input_transform": batch * self.in_channels * (4 * rows * (2 * columns + 2) + 16 * rows * columns),
            "winograd_output_transform": tiles * self.out_channels * 24,
        }

    def count_macs(self, inputs: tuple, output: torch.Tensor) -> dict[str, int]:
        """What this call really multiplied (convrewrite's MAC counter asks for this)."""
        x = inputs[0]
        return self.macs_breakdown(int(x.shape[0]), int(x.shape[2]), int(x.shape[3]))

    # ------------------------------------------------------------------ forward

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m, a = self.tile, self.tile + 2
        batch, channels, height, width = x.shape
        pad_h, pad_w = self.padding
        if self.padding_mode != "zeros" and (pad_h or pad_w):
            x = F.pad(x, (pad_w, pad_w, pad_h, pad_h), mode=_PADDING_MODES[self.padding_mode])
            height, width = height + 2 * pad_h, width + 2 * pad_w
            pad_h = pad_w = 0
        out_h, out_w = height + 2 * pad_h - 2, width + 2 * pad_w - 2
        rows, columns = -(-out_h // m), -(-out_w // m)
        # Zero rows and columns up to whole tiles; they only reach outputs that are cropped away.
        x = F.pad(x, (pad_w, columns * m + 2 - width - pad_w, pad_h, rows * m + 2 - height - pad_h))
        positions = batch * rows * columns
        if m == 2:
            # B^T d B by additions of strided slices of the whole (C, N, H, W) image: the row
            # step runs once per tile row (overlapping tiles share it), the column step per tile.
            transformed = _input_transform_2x2(x.transpose(0, 1), rows, columns).reshape(a * a, -1)
        else:
            # Overlapping a x a tiles at stride m, as a view (N, C, rows, columns, a, a); one copy
            # lays them out as (a*a, C, N, rows, columns): channels first, grouped for the products.
            if torch.jit.is_tracing():
                # The TorchScript ONNX exporter cannot convert unfold of a padded tensor: strided slices.
                x = x.transpose(0, 1)
                tiles = torch.stack(
                    [x[:, :, i : i + m * rows : m, j : j + m * columns : m] for i in range(a) for j in range(a)]
                )
            else:
                tiles = x.unfold(2, a, m).unfold(3, a, m).permute(4, 5, 1, 0, 2, 3)
            input_transform, _, output_transform = winograd_transforms(m, x.dtype, x.device)
            transformed = torch.mm(input_transform, tiles.reshape(a * a, -1))
        weight = self._weight_in_transform_domain()
        per_group_in = channels // self.groups
        per_group_out = self.out_channels // self.groups
        if per_group_in == 1:
            # Depthwise (with channel multiplier): an elementwise product in the transform domain.
            products = transformed.reshape(a * a, channels, 1, positions) * weight.reshape(
                a * a, channels, per_group_out, 1
            )
        else:
            products = torch.matmul(
                weight.reshape(a * a, self.groups, per_group_out, per_group_in),
                transformed.reshape(a * a, self.groups, per_group_in, positions),
            )
        if m == 2:
            y = _output_transform_2x2(products.reshape(a, a, -1))
        else:
            _, _, output_transform = winograd_transforms(m, x.dtype, x.device)
            y = torch.mm(output_transform, products.reshape(a * a, -1))
        y = y.reshape(m, m, self.out_channels, batch, rows, columns).permute(3, 2, 4, 0, 5, 1)
        y = y.reshape(batch, self.out_channels, rows * m, columns * m)[:, :, :out_h, :out_w]
        if self.bias is not None:
            y = y + self.bias.reshape(1, -1, 1, 1)
        return y


def _input_transform_2x2(x: torch.Tensor, rows: int, columns: int) -> torch.Tensor:
    """``B^T d B`` for F(2x2,3x3) on every 4x4 tile of ``x`` (C, N, 2 rows + 2, 2 columns + 2) at
    stride 2, by additions: (16, C, N, rows, columns), entry ``4 i + j`` the tile's (i, j).

    B^T = [[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]]: each transformed row is one
    sum or difference of two rows. Done on strided slices of the image, the row step costs 4
    additions per tile row and image column, the column step 16 per tile.
    """
    d0, d1, d2, d3 = (x[:, :, k : k + 2 * rows : 2] for k in range(4))
    transformed = []
    for t in (d0 - d2, d1 + d2, d2 - d1, d1 - d3):
        e0, e1, e2, e3 = (t[..., k : k + 2 * columns : 2] for k in range(4))
        transformed += [e0 - e2, e1 + e2, e2 - e1, e1 - e3]
    return torch.stack(transformed)


def _output_transform_2x2(products: torch.Tensor) -> torch.Tensor:
    """``A^T M A`` for F(2x2,3x3) on products laid out (4, 4, ...), giving (2, 2, ...).

    A^T = [[1, 1, 1, 0], [0, 1, -1, -1]]: two additions per output row entry (16 per tile for the
    rows), then the same on the columns of the two rows (8 per tile).
    """
    m0, m1, m2, m3 = products[0], products[1], products[2], products[3]
    rows = torch.stack([m0 + m1 + m2, m1 - m2 - m3])
    r0, r1, r2, r3 = rows[:, 0], rows[:, 1], rows[:, 2], rows[:, 3]
    return torch.stack([r0 + r1 + r2, r1 - r2 - r3], dim=1)
