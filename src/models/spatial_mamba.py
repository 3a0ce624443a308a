"""Spatial-Mamba backbone (arXiv 2410.15091): stem -> 4 stages of blocks -> head.

Read top to bottom: state fusion -> structure-aware SSM -> block -> stage -> model -> variants and
factories -> converter for the authors' checkpoints. Inside stages tensors are channels-last (B, H, W, C).
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from src.checks import BACKBONE_STRIDE, positive, require
from src.errors import InputNotFoundError, UserError
from src.kernels import (BACKENDS, FUSION_PADDINGS, SCANS, autocast_weights, depthwise_conv, layer_norm,
                         residual_drop_path, structure_aware_ssm)

TOTAL_STRIDE = BACKBONE_STRIDE


class StateFusion(nn.Module):
    """Learnable parameters of structure-aware state fusion: a depthwise k×k kernel per dilation and
    one mixing weight per dilation. The maths lives in `src.kernels` (every backend computes it)."""

    def __init__(self, dim: int, dilations: Sequence[int] = (1, 3, 5), kernel_size: int = 3):
        super().__init__()
        if kernel_size < 1 or kernel_size % 2 == 0:
            raise UserError(f"fusion kernel_size must be a positive odd number, got {kernel_size}")
        if any(int(d) < 1 for d in dilations):
            raise UserError(f"fusion dilations must be positive integers, got {list(dilations)}")
        self.dilations = tuple(int(d) for d in dilations)
        self.kernel_size = kernel_size
        self.weight = nn.Parameter(torch.ones(len(self.dilations), dim, kernel_size, kernel_size))
        self.alpha = nn.Parameter(torch.ones(len(self.dilations)))

    def extra_repr(self) -> str:
        return f"dilations={list(self.dilations)}, kernel_size={self.kernel_size}"


def _linear(module: nn.Linear, x: torch.Tensor, weight: torch.Tensor | None = None,
            bias: torch.Tensor | None = None) -> torch.Tensor:
    """module(x); with `weight` (and `bias`) given, the same product with them in place of the module's."""
    return module(x) if weight is None else F.linear(x, weight, bias)


class StructureAwareSSM(nn.Module):
    """Selective SSM along one raster scan whose states are fused with their spatial neighbours."""

    def __init__(
        self,
        dim: int,
        expand: int = 2,
        d_state: int = 1,
        dilations: Sequence[int] = (1, 3, 5),
        fusion_kernel_size: int = 3,
        scan: str = "row",
        backend: str = "torch",
        fusion_eval_padding: str = "replicate",
        dt_min: float = 1e-3,
        dt_max: float = 1e-1,
        dt_init_floor: float = 1e-4,
        fused_norms: bool = False,
        fused_convs: bool = False,
        fused_drop_path: bool = False,
    ):
        super().__init__()
        if scan not in SCANS:
            raise UserError(f"unknown scan {scan!r}; expected one of {tuple(SCANS)}")
        if backend not in BACKENDS:
            raise UserError(f"unknown backend {backend!r}; expected one of {BACKENDS}")
        if d_state < 1:
            raise UserError(f"d_state must be >= 1, got {d_state}")
        if fusion_eval_padding not in FUSION_PADDINGS:
            raise UserError(f"fusion_eval_padding must be one of {FUSION_PADDINGS}, got {fusion_eval_padding!r}")
        self.d_inner = d_inner = expand * dim
        self.d_state = d_state
        self.dt_rank = dt_rank = math.ceil(dim / 16)
        self.scan = scan
        self.backend = backend
        self.fused_norms = fused_norms
        self.fused_convs = fused_convs
        self.fused_drop_path = fused_drop_path
        self.fusion_eval_padding = fusion_eval_padding

        self.in_proj = nn.Linear(dim, 2 * d_inner, bias=False)
        self.conv = nn.Conv2d(d_inner, d_inner, 3, padding=1, groups=d_inner)
        self.x_proj = nn.Linear(d_inner, dt_rank + 2 * d_state, bias=False)
        self.dt_proj = nn.Linear(dt_rank, d_inner, bias=False)
        self.x_proj.keep_default_init = True  # not trunc-normal like the other linears
        self.dt_proj.keep_default_init = True
        self.dt_bias = nn.Parameter(torch.empty(d_inner))
        A = torch.arange(1, d_state + 1, dtype=torch.get_default_dtype())  # the parameters' dtype: fp64 stays fp64
        self.A_log = nn.Parameter(torch.log(A).repeat(d_inner, 1))
        self.D = nn.Parameter(torch.ones(d_inner))
        self.state_fusion = StateFusion(d_inner, dilations, fusion_kernel_size)
        self.out_norm = nn.LayerNorm(d_inner)
        self.out_proj = nn.Linear(d_inner, dim, bias=False)

        # Δ starts log-uniform in [dt_min, dt_max]: dt_bias = softplus⁻¹(Δ₀)
        nn.init.uniform_(self.dt_proj.weight, -dt_rank**-0.5, dt_rank**-0.5)
        with torch.no_grad():
            dt0 = torch.exp(torch.rand(d_inner) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
            dt0 = dt0.clamp(min=dt_init_floor)
            self.dt_bias.copy_(dt0 + torch.log(-torch.expm1(-dt0)))

    @property
    def norm_backend(self) -> str:
        """The backend of the block's LayerNorms (`src.kernels.layer_norm`): Triton kernels with `fused`."""
        return self.backend if self.fused_norms else "torch"

    @property
    def conv_backend(self) -> str:
        """The backend of the block's depthwise convolutions (`src.kernels.depthwise_conv`): Triton kernels with
        `fused`."""
        return self.backend if self.fused_convs else "torch"

    @property
    def drop_path_backend(self) -> str:
        """The backend of the block's residual adds with stochastic depth (`src.kernels.residual_drop_path`)."""
        return self.backend if self.fused_drop_path else "torch"

    @property
    def matmul_weights(self) -> tuple[torch.Tensor, ...]:
        """The weights of the projections, in the order `forward` takes them."""
        return self.in_proj.weight, self.x_proj.weight, self.dt_proj.weight, self.out_proj.weight

    def forward(self, u: torch.Tensor, weights: Sequence[torch.Tensor] | None = None) -> torch.Tensor:
        """`weights`: the projections' weights to use (`matmul_weights`, e.g. cast for autocast); None: the
        modules."""
        Bsz, H, W, _ = u.shape
        w_in, w_x, w_dt, w_out = (None,) * 4 if weights is None else weights
        x, z = _linear(self.in_proj, u, w_in).chunk(2, dim=-1)  # (B, H, W, D) each
        x = depthwise_conv(x, self.conv, silu=True, backend=self.conv_backend)  # (B, H, W, D), conv on a view
        x = x.reshape(Bsz, H * W, self.d_inner)  # (B, L, D): a view, the conv output being channels-last
        dt, B, C = _linear(self.x_proj, x, w_x).split([self.dt_rank, self.d_state, self.d_state], dim=-1)
        dt = _linear(self.dt_proj, dt, w_dt)  # (B, L, R) -> (B, L, D)
        A_log = self.A_log if self.A_log.dtype in (torch.float32, torch.float64) else self.A_log.float()
        A = -torch.exp(A_log)  # fp32 at least, fp64 kept
        y = structure_aware_ssm(
            x, dt, A, B, C, self.D, self.dt_bias,
            self.state_fusion.weight, self.state_fusion.alpha, self.state_fusion.dilations, H, W,
            scan=self.scan, backend=self.backend, padding="replicate" if self.training else self.fusion_eval_padding,
        )  # (B, L, D), channels last throughout: no transposes around the op
        y = layer_norm(y.reshape(Bsz, H, W, self.d_inner), self.out_norm, z, self.norm_backend)  # LN(y)·silu(z)
        return _linear(self.out_proj, y, w_out)


class Mlp(nn.Module):
    def __init__(self, dim: int, ratio: float = 4.0):
        super().__init__()
        hidden = int(dim * ratio)
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    @property
    def matmul_weights(self) -> tuple[torch.Tensor, ...]:
        """fc1's weight and bias, fc2's: the order `forward` takes them in."""
        return self.fc1.weight, self.fc1.bias, self.fc2.weight, self.fc2.bias

    def forward(self, x: torch.Tensor, weights: Sequence[torch.Tensor] | None = None) -> torch.Tensor:
        """`weights`: as `matmul_weights` (e.g. cast for autocast); None: the modules'."""
        w1, b1, w2, b2 = (None,) * 4 if weights is None else weights
        return _linear(self.fc2, self.act(_linear(self.fc1, x, w1, b1)), w2, b2)


class Block(nn.Module):
    """cpe -> SSM -> cpe -> MLP, each with a residual; channels-last (B, H, W, C) in and out; `drop_path`: this
    block's stochastic-depth rate."""

    def __init__(self, dim: int, mlp_ratio: float = 4.0, drop_path: float = 0.0, **ssm_kwargs):
        super().__init__()
        self.cpe1 = nn.Conv2d(dim, dim, 3, padding=1, groups=dim)
        self.norm1 = nn.LayerNorm(dim)
        self.ssm = StructureAwareSSM(dim, **ssm_kwargs)
        self.cpe2 = nn.Conv2d(dim, dim, 3, padding=1, groups=dim)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, mlp_ratio)
        # the keep probability as a tensor: compiled, each block's graph then takes it as an input rather than
        # baking it in, so the blocks of a stage, whose rates differ, share one graph under regional compilation.
        # 1 - p is computed once here (for an fp32 buffer the same bits as each branch of each step computed
        # before). Masks are drawn at rate 0 too: skipping them would shift the random stream of every later draw
        # (the digits quickstart's default run then ended at 98.9 instead of 99.7 % top-1)
        self.register_buffer("keep_prob", 1.0 - torch.tensor(float(drop_path)), persistent=False)

    @property
    def drop_prob(self) -> torch.Tensor:
        """The probability of dropping this block's residual branches in training."""
        return 1.0 - self.keep_prob

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # the projections' weights, under autocast with the Triton kernels cast at once rather than one by one by
        # each linear (fewer ops for the host to issue; the same values: `autocast_weights`)
        weights = autocast_weights(x, self.ssm.matmul_weights + self.mlp.matmul_weights, self.ssm.backend)
        x = depthwise_conv(x, self.cpe1, residual=True, backend=self.ssm.conv_backend)  # x + cpe1(x)
        x = residual_drop_path(x, self.ssm(layer_norm(x, self.norm1, backend=self.ssm.norm_backend), weights[:4]),
                               self.keep_prob, self.training, backend=self.ssm.drop_path_backend)
        x = depthwise_conv(x, self.cpe2, residual=True, backend=self.ssm.conv_backend)
        x = residual_drop_path(x, self.mlp(layer_norm(x, self.norm2, backend=self.ssm.norm_backend), weights[4:]),
                               self.keep_prob, self.training, backend=self.ssm.drop_path_backend)
        return x


class ConvNorm(nn.Sequential):
    """Conv (no bias) + BatchNorm, optionally + ReLU."""

    def __init__(self, cin: int, cout: int, kernel_size: int, stride: int = 1, act: bool = True):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel_size, stride, kernel_size // 2, bias=False)
        self.norm = nn.BatchNorm2d(cout)
        if act:
            self.act = nn.ReLU()


class Stem(nn.Module):
    """/4 convolutional stem: conv s2 -> residual pair of convs -> conv s2 -> 1×1 projection."""

    def __init__(self, in_chans: int, dim: int):
        super().__init__()
        half = dim // 2
        self.conv1 = ConvNorm(in_chans, half, 3, 2)
        self.residual = nn.Sequential(ConvNorm(half, half, 3), ConvNorm(half, half, 3, act=False))
        self.conv2 = ConvNorm(half, 4 * dim, 3, 2)
        self.proj = ConvNorm(4 * dim, dim, 1, act=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(x)
        x = x + self.residual(x)
        return self.proj(self.conv2(x))


class Downsample(nn.Module):
    """C -> C_out at half resolution: 1×1 expand (4·C_out) -> depthwise 3×3 s2 -> 1×1 reduce + BN."""

    def __init__(self, dim: int, out_dim: int, ratio: int = 4):
        super().__init__()
        hidden = ratio * out_dim
        self.expand = nn.Conv2d(dim, hidden, 1)
        self.dwconv = nn.Conv2d(hidden, hidden, 3, 2, 1, groups=hidden)
        self.reduce = nn.Conv2d(hidden, out_dim, 1)
        self.norm = nn.BatchNorm2d(out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.dwconv(F.relu(self.expand(x))))
        return self.norm(self.reduce(x))


class SpatialMamba(nn.Module):
    """Spatial-Mamba image backbone.

    Args:
        num_classes: classes of the linear head (0: no head, `forward` returns pooled features).
        in_chans: input image channels.
        dims: channels of the four stages.
        depths: blocks per stage.
        mlp_ratio: MLP hidden width / channels.
        drop_path_rate: stochastic depth, increased linearly from 0 to this over all blocks.
        d_state: SSM state size N (the paper: 1; N > 1 runs on the `torch` backend only).
        dilations: dilations of structure-aware state fusion; [] is plain Mamba observation y = h·C + D·x.
        fusion_kernel_size: size k of the depthwise k×k fusion kernels (odd).
        scan: token order of the SSM: row (paper), row_reversed, column, column_reversed,
            bidirectional (row + reversed, states summed) or cross (all four).
        backend: kernels computing scan + fusion + observation: torch, triton, fused or auto.
        fused_norms: with the fused backend, the blocks' LayerNorms (and the SSM's LN·silu(z) gate) run as
            Triton kernels in eager mode, in autocast's dtype (src/kernels/norms.py), instead of nn.LayerNorm
            (which the other backends and compiled graphs always use). For eager T (bf16, batch 128, H100) they
            cut the kernels' time per step from 105 to 81 ms and the peak memory from 16.3 to 12.9 GB, but add
            host time per launch; where the host already bounds the step (a slow CPU) eager training got slower
            (911 vs 1152 img/s), so they are off by default: turn them on where the GPU is the bottleneck.
        fused_convs: with the fused backend, the blocks' depthwise convolutions (the two positional encodings
            with their residual, the SSM's convolution with its SiLU) run as Triton kernels in eager mode
            (src/kernels/dwconv.py): one kernel forward, three backward, instead of cuDNN's and about a dozen
            small kernels and autograd nodes each (compiled graphs on a GPU launch the same kernels themselves:
            `depthwise_conv_traced`). Off by default (the ImageNet recipe, whose eager step is recorded as CUDA
            graphs, turns it on).
        fused_drop_path: with the fused backend, the residual adds of the SSM and MLP branches with stochastic
            depth run as one Triton kernel each way in eager training (src/kernels/droppath.py), instead of three
            forward and two backward; the same random draws and, on a GPU, the same bits. Off by default (on in
            the ImageNet recipe).
        fusion_eval_padding: padding of the state fusion in eval mode. "replicate" (default): as in training.
            "zeros": the authors' evaluation code, which runs the fusion kernels merged into one 11×11 kernel
            with zero padding (training pads by replication), to reproduce their published accuracies with
            their weights; it runs on the torch reference whatever the backend. Training is unchanged.
        features_only: no head; `forward` returns LayerNorm-ed stage maps for dense heads (the timm way).
        out_indices: with features_only, the stages whose maps are returned, in order (0..3, strides 4, 8,
            16, 32); None = all four. Only the selected stages get a LayerNorm; stages after the last selected
            one are still built (an ImageNet checkpoint loads unchanged) but not run, so under DDP select stage 3
            or set the strategy's find_unused_parameters.
        grad_checkpointing: recompute each block in the backward pass instead of storing its
            activations (less memory for huge batches or images, about a third more compute).
        pretrained: path of a checkpoint (this project's or the authors') to load after building.
    """

    def __init__(
        self,
        num_classes: int = 1000,
        in_chans: int = 3,
        dims: Sequence[int] = (64, 128, 256, 512),
        depths: Sequence[int] = (2, 4, 8, 4),
        mlp_ratio: float = 4.0,
        drop_path_rate: float = 0.2,
        d_state: int = 1,
        dilations: Sequence[int] = (1, 3, 5),
        fusion_kernel_size: int = 3,
        scan: str = "row",
        backend: str = "torch",
        fused_norms: bool = False,
        fused_convs: bool = False,
        fused_drop_path: bool = False,
        fusion_eval_padding: Literal["replicate", "zeros"] = "replicate",
        features_only: bool = False,
        out_indices: Sequence[int] | None = None,
        grad_checkpointing: bool = False,
        pretrained: str | None = None,
    ):
        super().__init__()
        dims, depths = list(dims), list(depths)
        if len(dims) != 4 or len(depths) != 4:
            raise UserError(f"dims and depths need 4 entries (one per stage), got dims={dims} depths={depths}")
        if any(int(d) != d or d < 0 for d in depths) or any(int(d) != d or d < 1 for d in dims):
            raise UserError(f"depths must be integers >= 0 and dims integers >= 1, got depths={depths} dims={dims}")
        if not 0.0 <= drop_path_rate < 1.0:
            raise UserError(f"drop_path_rate must be in [0, 1) (the probability of dropping a block's branch), "
                             f"got {drop_path_rate}")
        require(num_classes >= 0, "num_classes", ">= 0 (0: no head)", num_classes)
        require(in_chans >= 1, "in_chans", ">= 1", in_chans)
        positive("mlp_ratio", mlp_ratio)
        if out_indices is not None:
            out_indices = [int(i) for i in out_indices]
            if not features_only:
                raise UserError(f"out_indices={out_indices} selects feature maps; it needs features_only=True")
            if not out_indices or out_indices != sorted(set(out_indices)) or not set(out_indices) <= {0, 1, 2, 3}:
                raise UserError(f"out_indices must be increasing stage indices from 0..3 (strides 4, 8, 16, 32), "
                                f"got {out_indices}")
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.dims = dims
        self.features_only = features_only
        self.out_indices = tuple(out_indices) if out_indices is not None else (0, 1, 2, 3)
        self.grad_checkpointing = grad_checkpointing
        self._cudagraph_blocks = False  # compile(regional=True) with CUDA graphs: see forward_features
        # the knobs that define the function the weights compute: recorded in checkpoints, compared on load
        self._architecture = dict(
            num_classes=num_classes, in_chans=in_chans, dims=[int(d) for d in dims], depths=[int(d) for d in depths],
            mlp_ratio=float(mlp_ratio), d_state=d_state, dilations=[int(d) for d in dilations],
            fusion_kernel_size=fusion_kernel_size, scan=scan, features_only=features_only,
        )
        self.backend = backend
        self.pretrained = pretrained
        self.stem = Stem(in_chans, dims[0])
        rates = torch.linspace(0, drop_path_rate, sum(depths)).tolist()
        ssm_kwargs = dict(
            d_state=d_state, dilations=dilations, fusion_kernel_size=fusion_kernel_size, scan=scan, backend=backend,
            fusion_eval_padding=fusion_eval_padding, fused_norms=fused_norms, fused_convs=fused_convs,
            fused_drop_path=fused_drop_path,
        )
        self.stages = nn.ModuleList()
        for i, (dim, depth) in enumerate(zip(dims, depths)):
            first = sum(depths[:i])
            blocks = [Block(dim, mlp_ratio, rates[first + j], **ssm_kwargs) for j in range(depth)]
            self.stages.append(nn.Sequential(*blocks))
        self.downsamples = nn.ModuleList(Downsample(dims[i], dims[i + 1]) for i in range(3))
        if not features_only:
            self.norm = nn.LayerNorm(dims[-1])
            self.head = nn.Linear(dims[-1], num_classes) if num_classes > 0 else nn.Identity()
        self.apply(_init_weights)
        if pretrained:
            # an ImageNet checkpoint: with features_only its classifier (head.*, norm.*) is dropped by name
            load_pretrained(self, pretrained)
            if features_only:
                from lightning.pytorch.utilities import rank_zero_info

                rank_zero_info(f"loaded {pretrained} into the features backbone; its classifier head (head.*, "
                               f"norm.*) is dropped, the stage norms of out_indices {list(self.out_indices)} are new")
        if features_only:
            # after loading: an ImageNet checkpoint has no stage norms. A dict keyed "0".."3" has the same
            # state-dict names as a list of four norms. LayerNorm's own init is _init_weights' (ones, zeros).
            self.feature_norms = nn.ModuleDict({str(i): nn.LayerNorm(dims[i]) for i in self.out_indices})

    def set_backend(self, backend: str, fused_norms: bool | None = None, fused_convs: bool | None = None,
                    fused_drop_path: bool | None = None) -> None:
        """Switch the kernel backend of every block (the parameters stay as they are), and with `fused_norms` /
        `fused_convs` / `fused_drop_path` whether the fused backend runs the LayerNorms / depthwise convolutions /
        residual adds with stochastic depth as Triton kernels too (None: unchanged)."""
        if backend not in BACKENDS:
            raise UserError(f"unknown backend {backend!r}; expected one of {BACKENDS}")
        for m in self.modules():
            if isinstance(m, StructureAwareSSM):
                m.backend = backend
                if fused_norms is not None:
                    m.fused_norms = fused_norms
                if fused_convs is not None:
                    m.fused_convs = fused_convs
                if fused_drop_path is not None:
                    m.fused_drop_path = fused_drop_path
        self.backend = backend

    # graphs a regionally compiled block may need: 4 stage shapes × train / eval × a few batch sizes (the last,
    # smaller batch of an epoch; validation's), over dynamo's default of 8 per code object, past which it would
    # quietly run the block eagerly
    RECOMPILE_LIMIT = 32

    def compile(self, *args, regional: bool = False, **kwargs) -> None:
        """`torch.compile` in place (parameter names unchanged), by default the whole forward as one graph.
        regional=True compiles each block on its own: the blocks of a stage have the same shapes (and take their
        drop-path rate as an input), so dynamo compiles one graph per stage and reuses it for every block of that
        stage — fewer, smaller graphs to compile, no fusion across blocks. The stem and the downsamples (convs
        and BatchNorms, run by cuDNN) stay eager: compiled on their own under an activation memory budget below
        1 (src/compiling.py), their backward once failed with "modified by an inplace operation" on a
        128-element tensor, by its size a BatchNorm running statistic that the compiled forward updates in place
        after the partitioner kept it for the recomputation (with torch 2.14 on a CPU they now compile and train;
        `benchmarks/profile_step.py --compile --regional --compile-stem` measures them on a GPU). Other arguments
        go to `torch.compile`; regional shapes are static unless `dynamic` is given."""
        if not regional:
            super().compile(*args, **kwargs)
            return
        kwargs = self.block_compile_kwargs(**kwargs)
        self._cudagraph_blocks = kwargs.get("mode") in ("reduce-overhead", "max-autotune") or bool(
            (kwargs.get("options") or {}).get("triton.cudagraphs"))
        limit = "recompile_limit" if hasattr(torch._dynamo.config, "recompile_limit") else "cache_size_limit"
        setattr(torch._dynamo.config, limit, max(getattr(torch._dynamo.config, limit), self.RECOMPILE_LIMIT))
        for stage in self.stages:
            for block in stage:
                block.compile(*args, **kwargs)

    @staticmethod
    def block_compile_kwargs(**kwargs) -> dict:
        """`torch.compile` arguments of a regionally compiled block, from those given to `compile(regional=True)`:
        - `dynamic=False` unless given: the stages differ in size, and dynamo's automatic dynamic shapes would turn
          the second stage's graph into a symbolic one whose guards then fail on the next block (a graph per block
          again);
        - inductor's layout optimisation off (`options["layout_optimization"] = False` unless given). In a graph
          with convolutions it gives every 4-D tensor the channels-last strides of an (N, C, H, W) map; a block's
          residual stream is (B, H, W, C), whose buffers thus got (B, W, C, H)-ordered strides, and the inputs of
          the depthwise convolutions that the backward recomputes from them (the activation memory budget) were
          neither channels-last nor contiguous: their backward ran in PyTorch's native depthwise kernels after
          copies instead of cuDNN's NHWC kernels. Off, the convolutions see the channels-last views the block
          makes itself. T, bf16, batch 128, on an H100 (regional graphs as CUDA graphs,
          `benchmarks/profile_step.py`): 73.9 ms per training step instead of 100.9 (72 of 99 ms of kernels);
        - `mode` turned into the inductor options it stands for (`torch.compile` takes one or the other), so that
          the option above can be added to it.
        The last two only for inductor (the default backend). The parallel compile workers
        (`src.compiling.ParallelRegionalCompile`) compile with the same arguments."""
        import torch._inductor

        kwargs.setdefault("dynamic", False)
        if kwargs.get("backend", "inductor") != "inductor":
            return kwargs
        mode = kwargs.pop("mode", None)
        options = dict(torch._inductor.list_mode_options(mode, kwargs["dynamic"]) if mode not in (None, "default")
                       else {})
        options.update(kwargs.get("options") or {})
        options.setdefault("layout_optimization", False)
        return dict(kwargs, options=options)

    def stage_blocks(self, images: Sequence[int]) -> list[tuple[nn.Module, tuple[int, int, int, int]]]:
        """For images of shape (B, C, H, W) (H, W multiples of 32): (the first block, the blocks' input shape
        (B, H_i, W_i, C_i), channels-last) of every non-empty stage a forward runs. Under regional compilation
        these are the graphs a forward compiles (`src.compiling.ParallelRegionalCompile`)."""
        B, _, H, W = images
        last = self.out_indices[-1] if self.features_only else 3
        return [(stage[0], (B, H // 2 ** (i + 2), W // 2 ** (i + 2), self.dims[i]))
                for i, stage in enumerate(self.stages[: last + 1]) if len(stage)]

    @staticmethod
    def _stage_input(x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, H, W, C), contiguous: free for channels-last maps (the GPU default), whose permute
        is a contiguous view; otherwise one copy. Every block of a stage then sees the same strides, so a
        regionally compiled stage needs one graph, not one for its first block and one for the rest."""
        return x.permute(0, 2, 3, 1).contiguous()

    def architecture(self) -> dict:
        """Architecture knobs (plain values) and the kernel backend, which computes the same function."""
        return {**self._architecture, "backend": self.backend}

    def no_weight_decay(self) -> set[str]:
        """Parameters trained without weight decay: norms, biases, A_log, D and fusion mixing weights."""
        return {n for n, p in self.named_parameters() if p.ndim <= 1 or n.endswith("A_log")}

    def check_input(self, x: torch.Tensor) -> None:
        if x.ndim != 4:
            raise UserError(f"expected images of shape (B, {self.in_chans}, H, W), got shape {tuple(x.shape)}")
        if x.shape[1] != self.in_chans:
            raise UserError(f"expected {self.in_chans} input channels, got {x.shape[1]} (shape {tuple(x.shape)})")
        H, W = x.shape[-2:]
        if H % TOTAL_STRIDE or W % TOTAL_STRIDE:
            raise UserError(
                f"image size {H}×{W} is not a multiple of {TOTAL_STRIDE} (the backbone's total stride); "
                f"resize or pad it, e.g. to {math.ceil(H / TOTAL_STRIDE) * TOTAL_STRIDE}×"
                f"{math.ceil(W / TOTAL_STRIDE) * TOTAL_STRIDE}"
            )

    def forward_features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The stage maps (B, C_i, H/2^(i+2), W/2^(i+2)), strides 4, 8, 16, 32: all four, or with
        features_only those of `out_indices` (LayerNorm-ed)."""
        self.check_input(x)
        x = self._stage_input(self.stem(x))
        features = []
        last = self.out_indices[-1] if self.features_only else 3
        for i, stage in enumerate(self.stages[: last + 1]):
            if self.grad_checkpointing and self.training and torch.is_grad_enabled():
                for block in stage:
                    x = checkpoint(block, x, use_reentrant=False)
            elif self._cudagraph_blocks and not torch.is_grad_enabled():
                # blocks replayed as CUDA graphs, no backward pending (evaluation, a teacher's forward): each call
                # of a block's graph starts a new generation of CUDA graph trees, which frees the previous
                # generation's outputs, so a block's output must not be the next block's input, nor a returned
                # feature map (torch 2.11 raises "accessing tensor output of CUDAGraphs that has been overwritten",
                # pytorch/pytorch#152887); so each output is copied (one memory-bound copy per block)
                for block in stage:
                    x = block(x).clone()
            else:
                x = stage(x)
            if not self.features_only:
                features.append(x.permute(0, 3, 1, 2))
            elif i in self.out_indices:
                features.append(self.feature_norms[str(i)](x).permute(0, 3, 1, 2))
            if i < last:
                x = self._stage_input(self.downsamples[i](x.permute(0, 3, 1, 2)))
        return features

    def forward_head(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm(x.permute(0, 2, 3, 1)).mean(dim=(1, 2))  # LN, then global average pool
        return self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
        features = self.forward_features(x)
        return features if self.features_only else self.forward_head(features[-1])


def _init_weights(m: nn.Module) -> None:
    if isinstance(m, nn.Linear) and not getattr(m, "keep_default_init", False):
        nn.init.trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)


# ---------------------------------------------------------------------------------------------------
# Variants and factories

VARIANTS = {
    "tiny": dict(dims=(64, 128, 256, 512), depths=(2, 4, 8, 4), drop_path_rate=0.2),
    "small": dict(dims=(64, 128, 256, 512), depths=(2, 4, 21, 5), drop_path_rate=0.3),
    "base": dict(dims=(96, 192, 384, 768), depths=(2, 4, 21, 5), drop_path_rate=0.5),
    # the embedded default run (digits, 32×32): same architecture, narrow and shallow
    "digits": dict(dims=(16, 32, 64, 128), depths=(1, 1, 2, 1), drop_path_rate=0.0),
}


def spatial_mamba_t(**kwargs) -> SpatialMamba:
    return SpatialMamba(**{**VARIANTS["tiny"], **kwargs})


def spatial_mamba_s(**kwargs) -> SpatialMamba:
    return SpatialMamba(**{**VARIANTS["small"], **kwargs})


def spatial_mamba_b(**kwargs) -> SpatialMamba:
    return SpatialMamba(**{**VARIANTS["base"], **kwargs})


def spatial_mamba_digits(**kwargs) -> SpatialMamba:
    return SpatialMamba(**{**VARIANTS["digits"], "num_classes": 10, **kwargs})


# ---------------------------------------------------------------------------------------------------
# Checkpoints: the authors' key names -> ours

_OFFICIAL_RENAMES = [
    (r"^patch_embed\.conv1\.", "stem.conv1."),
    (r"^patch_embed\.conv2\.", "stem.residual."),
    (r"^patch_embed\.conv3\.0\.", "stem.conv2."),
    (r"^patch_embed\.conv3\.1\.", "stem.proj."),
    (r"^layers\.(\d+)\.downsample\.conv\.0\.conv\.", r"downsamples.\1.expand."),
    (r"^layers\.(\d+)\.downsample\.conv\.1\.conv\.", r"downsamples.\1.dwconv."),
    (r"^layers\.(\d+)\.downsample\.conv\.2\.conv\.", r"downsamples.\1.reduce."),
    (r"^layers\.(\d+)\.downsample\.conv\.2\.norm\.", r"downsamples.\1.norm."),
    (r"^layers\.(\d+)\.blocks\.(\d+)\.", r"stages.\1.\2."),
    (r"\.ln_1\.", ".norm1."),
    (r"\.ln_2\.", ".norm2."),
    (r"\.self_attention\.", ".ssm."),
    (r"\.ssm\.conv2d\.", ".ssm.conv."),
    (r"\.ssm\.x_proj_weight$", ".ssm.x_proj.weight"),
    (r"\.ssm\.dt_projs_weight$", ".ssm.dt_proj.weight"),
    (r"\.ssm\.dt_projs_bias$", ".ssm.dt_bias"),
    (r"\.ssm\.A_logs$", ".ssm.A_log"),
    (r"\.ssm\.Ds$", ".ssm.D"),
]
# the authors keep one parameter per dilation (1, 3, 5); we stack them into one (K, D, k, k) tensor
_OFFICIAL_FUSION_KERNELS = ("kernel_3", "kernel_3_1", "kernel_3_2")


def is_official_state_dict(state_dict: dict) -> bool:
    return any(k.startswith(("patch_embed.", "layers.")) for k in state_dict)


def convert_official_state_dict(state_dict: dict) -> dict:
    """Map a state dict with the authors' key names onto this project's modules."""
    out, kernels = {}, {}
    for key, value in state_dict.items():
        for pattern, repl in _OFFICIAL_RENAMES:
            key = re.sub(pattern, repl, key)
        prefix, _, leaf = key.rpartition(".")
        if leaf in _OFFICIAL_FUSION_KERNELS and prefix.endswith("state_fusion"):
            kernels.setdefault(prefix, {})[leaf] = value
            continue
        out[key] = value
    for prefix, parts in kernels.items():
        missing = [name for name in _OFFICIAL_FUSION_KERNELS if name not in parts]
        if missing:
            from src.checkpoints import CheckpointKeysError

            raise CheckpointKeysError(f"checkpoint has state fusion kernels of {prefix} but lacks {missing}")
        out[f"{prefix}.weight"] = torch.stack([parts[name][:, 0] for name in _OFFICIAL_FUSION_KERNELS])
    return out


def extract_state_dict(checkpoint: dict) -> dict:
    """The backbone's weights from a raw state dict, an authors' file ("model") or a Lightning checkpoint."""
    if "state_dict" in checkpoint and isinstance(checkpoint["state_dict"], dict):  # Lightning
        sd = checkpoint["state_dict"]
        return {k.removeprefix("backbone."): v for k, v in sd.items() if k.startswith("backbone.")} or sd
    if "model" in checkpoint and isinstance(checkpoint["model"], dict):
        return checkpoint["model"]
    return checkpoint


def load_pretrained(model: SpatialMamba, path: str | os.PathLike, strict: bool = True) -> None:
    """Load a checkpoint into `model`; the authors' key names are converted. A head of another
    number of classes is left at its initialisation (fine-tuning); any other mismatch is an error."""
    # src.checkpoints imports lightning: here, not at the top, so that the model's code imports without it (a
    # compile worker process, src/compile_worker.py, starts seconds sooner)
    from src.checkpoints import CheckpointError, CheckpointKeysError, check_architecture, load_checkpoint

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise InputNotFoundError(f"pretrained checkpoint not found: {path!r}")
    checkpoint = load_checkpoint(path)  # weights only: a file holding code is refused
    if isinstance(checkpoint.get("architecture"), dict):  # this project's Lightning checkpoints
        # another head (fine-tuning) and the features-only form (dense tasks) are meant uses of pretrained weights
        check_architecture(checkpoint["architecture"], model.architecture(), path,
                           ignore=("num_classes", "features_only"))
    state_dict = extract_state_dict(checkpoint)
    if is_official_state_dict(state_dict):
        state_dict = convert_official_state_dict(state_dict)
    own = model.state_dict()
    skipped = [k for k, v in state_dict.items() if k.startswith("head.") and k in own and v.shape != own[k].shape]
    for k in skipped:
        del state_dict[k]
    if model.features_only:
        state_dict = {k: v for k, v in state_dict.items() if not k.startswith(("head.", "norm."))}
    missing = sorted(set(own) - set(state_dict) - set(skipped))
    unexpected = sorted(set(state_dict) - set(own))
    if strict and (missing or unexpected):
        raise CheckpointKeysError(
            f"checkpoint {path!r} does not fit this model: missing keys {_abbrev(missing)}, "
            f"unexpected keys {_abbrev(unexpected)} (check dims/depths/dilations/d_state against the checkpoint)"
        )
    wrong = [f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(own[k].shape)}"
             for k, v in state_dict.items() if k in own and v.shape != own[k].shape]
    if wrong:
        raise CheckpointError(f"checkpoint {path!r} has tensors of the wrong shape: {_abbrev(wrong)}")
    model.load_state_dict(state_dict, strict=False)


def _abbrev(names: list[str], n: int = 8) -> str:
    return "[]" if not names else str(names[:n]) + (f" and {len(names) - n} more" if len(names) > n else "")
