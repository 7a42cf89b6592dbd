"""Window attention for Swin transformers: standard (Swin) and Krause (KSwin).

Both attend densely inside non-overlapping windows of a feature map, add a learned
relative position bias and, for shifted windows, the additive mask that keeps tokens of
different image regions apart. They differ only in the logits:

    Swin:  (q / sqrt(d)) . k
    KSwin: -||q / sqrt(d) - k / sqrt(d)||^2 / (2 sigma_h^2)   fp32, distance clamped at 0

Same parameters; KSwin adds its ``KrauseConfig`` and ``log_sigma`` (one per head, init
log 4.0). There is no top-k: a window is already a small neighbourhood.

Small feature maps (smaller than the window) are the block's business, as in Swin: it
shrinks the window to the map and disables the shift, for both variants alike.

Both are drop-ins for timm's Swin ``WindowAttention`` (same parameter and buffer names,
``forward(x, mask)``, ``set_window_size``); ``WindowKrauseAttention.from_attention`` builds
the Krause one around the parameters of an existing timm module. The checks that need
concrete shapes run in fx leaves (``torch.fx.wrap``), so a model around them traces.
"""

from __future__ import annotations

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

from .. import _validation as V
from ..dense import head_coefficient, squared_distances
from ._common import check_dropout, check_heads, log_sigma_parameter
from .config import KrauseConfig, resolve_config

SHIFT_MASK_VALUE = -100.0  # Swin's additive mask: exp(-100) underflows to 0 against any real logit


def _window_pair(window_size) -> tuple[int, int]:
    if isinstance(window_size, int) and not isinstance(window_size, bool):
        window_size = (window_size, window_size)
    if not (isinstance(window_size, (tuple, list)) and len(window_size) == 2):
        raise ValueError(f"window_size must be an int or a (height, width) pair, got {window_size!r}")
    return tuple(V.check_positive_int("window_size", w) for w in window_size)


def window_partition(x: torch.Tensor, window_size) -> torch.Tensor:
    """(B, H, W, C) -> (B * nW, wh, ww, C): non-overlapping windows, row-major per image."""
    wh, ww = _window_pair(window_size)
    b, h, w, c = x.shape
    if h % wh or w % ww:
        raise ValueError(f"window_size {(wh, ww)} does not tile the {h}x{w} feature map")
    x = x.view(b, h // wh, wh, w // ww, ww, c)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, wh, ww, c)


def window_reverse(windows: torch.Tensor, window_size, height: int, width: int) -> torch.Tensor:
    """Inverse of ``window_partition``: (B * nW, wh, ww, C) -> (B, height, width, C)."""
    wh, ww = _window_pair(window_size)
    c = windows.shape[-1]
    x = windows.view(-1, height // wh, width // ww, wh, ww, c)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, height, width, c)


def shifted_window_mask(height: int, width: int, window_size, shift_size, device=None) -> torch.Tensor:
    """Additive (nW, N, N) mask for shifted windows: 0 within a region, -100 across.

    After a cyclic shift by ``shift_size`` the windows on the bottom/right border hold
    tokens from up to four regions that are not neighbours in the image; tokens may attend
    only within their own region. With shift 0 the mask is all zeros.
    """
    wh, ww = _window_pair(window_size)
    sh, sw = (shift_size, shift_size) if isinstance(shift_size, int) else tuple(shift_size)
    if not (0 <= sh < wh and 0 <= sw < ww):
        raise ValueError(f"shift_size must be in [0, window_size), got {shift_size!r} for window {(wh, ww)}")
    region = torch.zeros(1, height, width, 1, device=device)
    label = 0
    # Three bands per axis: untouched, the part of the last window that stays, the wrapped-in part.
    for rows in (slice(0, height - wh), slice(height - wh, height - sh), slice(height - sh, height)):
        for cols in (slice(0, width - ww), slice(width - ww, width - sw), slice(width - sw, width)):
            region[:, rows, cols, :] = label
            label += 1
    labels = window_partition(region, (wh, ww)).reshape(-1, wh * ww)  # (nW, N)
    different = labels[:, None, :] != labels[:, :, None]
    return torch.zeros(different.shape, device=device).masked_fill(different, SHIFT_MASK_VALUE)


def relative_position_index(window_size) -> torch.Tensor:
    """(N, N) index into the ((2wh - 1) * (2ww - 1)) relative position bias table.

    Tokens i, j of a window at (r_i, c_i), (r_j, c_j) share the entry of their offset
    (r_i - r_j, c_i - c_j), shifted to be non-negative and flattened row-major.
    """
    wh, ww = _window_pair(window_size)
    rows, cols = torch.meshgrid(torch.arange(wh), torch.arange(ww), indexing="ij")
    rows, cols = rows.flatten(), cols.flatten()
    d_row = rows[:, None] - rows[None, :] + (wh - 1)
    d_col = cols[:, None] - cols[None, :] + (ww - 1)
    return d_row * (2 * ww - 1) + d_col


def checked_windows(x: torch.Tensor, window_size, mask) -> torch.Tensor:
    """x unchanged, after checking it holds whole windows that ``mask`` (nW, N, N) divides. An fx leaf."""
    n = window_size[0] * window_size[1]
    if x.dim() != 3 or x.shape[1] != n:
        raise ValueError(f"x holds {tuple(x.shape)} tokens per window but window_size {tuple(window_size)} needs {n}")
    if mask is not None and x.shape[0] % mask.shape[0]:
        raise ValueError(f"mask holds {mask.shape[0]} windows, which does not divide the {x.shape[0]} input windows")
    return x


torch.fx.wrap("checked_windows")


def _resize_bias_table(table: torch.Tensor, old_window, new_window) -> torch.Tensor:
    """A ((2wh - 1) * (2ww - 1), H) relative position bias table resized to another window:
    timm's own resize when timm is installed (so a KSwin and its timm Swin twin resize alike),
    else a bicubic interpolation."""
    (oh, ow), (nh, nw) = old_window, new_window
    shape = ((2 * nh - 1) * (2 * nw - 1), table.shape[1])
    try:
        from timm.layers import resize_rel_pos_bias_table
    except ImportError:  # krause itself needs only torch
        grid = table.detach().T.reshape(1, -1, 2 * oh - 1, 2 * ow - 1).float()
        grid = F.interpolate(grid, size=(2 * nh - 1, 2 * nw - 1), mode="bicubic", align_corners=False)
        return grid.reshape(-1, shape[0]).T.contiguous().to(table.dtype)
    return resize_rel_pos_bias_table(table.detach(), new_window_size=new_window, new_bias_shape=shape,
                                     old_window_size=old_window)


class WindowAttention(nn.Module):
    """Swin's window attention with relative position bias.

    forward(x (B * nW, N, C), mask (nW, N, N) additive or None) -> (B * nW, N, C);
    ``attention_weights(x, mask)`` gives the (B * nW, H, N, N) weights.
    """

    def __init__(self, dim: int, window_size, num_heads: int, *, qkv_bias: bool = True, attn_drop: float = 0.0,
                 proj_drop: float = 0.0):
        super().__init__()
        self.window_size = _window_pair(window_size)
        self.head_dim, _ = check_heads(dim, num_heads)
        self.num_heads = num_heads
        self.scale = self.head_dim**-0.5
        wh, ww = self.window_size
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * wh - 1) * (2 * ww - 1), num_heads))
        nn.init.trunc_normal_(self.relative_position_bias_table, std=0.02)
        # Derived from window_size: not part of the checkpoint.
        self.register_buffer("relative_position_index", relative_position_index(self.window_size), persistent=False)
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.attn_drop = nn.Dropout(check_dropout("attn_drop", attn_drop))
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(check_dropout("proj_drop", proj_drop))

    def set_window_size(self, window_size) -> None:
        """Another window (timm's ``set_input_size``): the bias table is resized bicubically."""
        window_size = _window_pair(window_size)
        if window_size == self.window_size:
            return
        table = self.relative_position_bias_table
        new = _resize_bias_table(table, self.window_size, window_size)
        self.relative_position_bias_table = nn.Parameter(new, requires_grad=table.requires_grad)
        self.window_size = window_size
        self.init_non_persistent_buffers()

    def init_non_persistent_buffers(self) -> None:
        """Recompute the relative position index (timm calls this after meta-device construction)."""
        self.register_buffer("relative_position_index",
                             relative_position_index(self.window_size).to(self.relative_position_bias_table.device),
                             persistent=False)

    def relative_position_bias(self) -> torch.Tensor:
        n = self.window_size[0] * self.window_size[1]
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)]
        return bias.view(n, n, self.num_heads).permute(2, 0, 1)  # (H, N, N)

    def logits(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """Content logits (B_, H, N, N), before bias and mask."""
        return (q * self.scale) @ k.transpose(-1, -2)

    def _bias_and_mask(self, num_windows_total: int, mask, dtype) -> torch.Tensor:
        """Relative position bias plus the shift mask, broadcastable to (B_, H, N, N)."""
        bias = self.relative_position_bias().to(dtype)[None]
        if mask is None:
            return bias
        nw = mask.shape[0]  # checked_windows: nw divides num_windows_total
        n = bias.shape[-1]
        bias = bias[:, None] + mask.to(dtype)[None, :, None]  # (1, nW, H, N, N)
        return bias.expand(num_windows_total // nw, -1, -1, -1, -1).reshape(num_windows_total, self.num_heads, n, n)

    def _split_qkv(self, x, mask=None):
        x = checked_windows(x, self.window_size, mask)
        b_, n, c = x.shape
        qkv = self.qkv(x).reshape(b_, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        return qkv.unbind(0)

    def _merge(self, out):
        b_, _, n, _ = out.shape
        return self.proj_drop(self.proj(out.transpose(1, 2).reshape(b_, n, -1)))

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        q, k, v = self._split_qkv(x, mask)
        # Fused path: SDPA adds the float mask to (q . k) * scale, exactly the logits above.
        bias = self._bias_and_mask(x.shape[0], mask, q.dtype)
        drop = self.attn_drop.p if self.training else 0.0
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=drop, scale=self.scale)
        return self._merge(out)

    def _probs(self, q, k, mask) -> torch.Tensor:
        logits = self.logits(q, k)
        return torch.softmax(logits + self._bias_and_mask(q.shape[0], mask, logits.dtype), dim=-1)

    def attention_weights(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """(B * nW, H, N, N) attention weights of the windows x (rows sum to 1)."""
        q, k, _ = self._split_qkv(x, mask)
        return self._probs(q, k, mask)


class WindowKrauseAttention(WindowAttention):
    """KSwin window attention (docs/method.md): Swin's window attention with the dot-product
    logits replaced by the RBF score -||q - k||^2 / (2 sigma_h^2) of the 1/sqrt(d)-scaled
    q and k, in fp32. Dense softmax within the window, no top-k: of ``config`` (default
    ``WindowKrauseAttention.preset``, keyword overrides accepted) it reads sigma and
    per_head_sigma.
    """

    preset = KrauseConfig(sigma=4.0)

    def __init__(self, dim: int, window_size, num_heads: int, config: KrauseConfig | None = None, *,
                 qkv_bias: bool = True, attn_drop: float = 0.0, proj_drop: float = 0.0, **overrides):
        super().__init__(dim, window_size, num_heads, qkv_bias=qkv_bias, attn_drop=attn_drop, proj_drop=proj_drop)
        self.config = resolve_config(self.preset, config, overrides)
        self.log_sigma = log_sigma_parameter(self.config.sigma, num_heads if self.config.per_head_sigma else None)

    impl = property(lambda self: self.config.impl)

    @classmethod
    def from_attention(cls, attn: nn.Module, config: KrauseConfig | None = None, **overrides) -> "WindowKrauseAttention":
        """The Krause twin of a Swin window attention (krause's or timm's): it takes over that
        module's qkv, proj, relative position bias table and dropouts (the same Parameter
        objects) and adds ``log_sigma`` on their device. Consumes no random numbers."""
        needed = ("qkv", "proj", "relative_position_bias_table", "window_size", "num_heads")
        if not all(hasattr(attn, n) for n in needed):
            raise ValueError(f"attn must be a Swin window attention (with {', '.join(needed)}), got {type(attn).__name__}")
        dim, heads = attn.qkv.in_features, attn.num_heads
        if attn.qkv.out_features != 3 * dim or attn.proj.in_features != dim:
            raise ValueError(f"attn: head width times heads must equal the width {dim} for Krause attention")
        with torch.device("meta"):  # shapes only: the real parameters are the given module's
            mod = cls(dim, tuple(attn.window_size), heads, config, qkv_bias=attn.qkv.bias is not None, **overrides)
        mod.qkv, mod.proj, mod.attn_drop, mod.proj_drop = attn.qkv, attn.proj, attn.attn_drop, attn.proj_drop
        mod.relative_position_bias_table = attn.relative_position_bias_table
        mod.init_non_persistent_buffers()
        mod.log_sigma = log_sigma_parameter(mod.config.sigma, heads if mod.config.per_head_sigma else None)
        mod.log_sigma.data = mod.log_sigma.data.to(attn.qkv.weight.device)
        return mod

    @property
    def sigma(self) -> torch.Tensor:
        return self.log_sigma.detach().exp()

    def logits(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        dist = squared_distances(q.float() * self.scale, k.float() * self.scale)
        return dist * -head_coefficient(self.log_sigma)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        q, k, v = self._split_qkv(x, mask)
        probs = self._probs(q, k, mask)
        return self._merge((self.attn_drop(probs) @ v.to(probs.dtype)).to(v.dtype))
