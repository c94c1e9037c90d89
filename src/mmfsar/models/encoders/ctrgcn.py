"""CTR-GCN (Chen et al., ICCV 2021, "Channel-wise Topology Refinement Graph Convolution"), the
skeleton backbone of MMCL (METHODS.md 4), on a dataset's own skeleton.

The network of the reference implementation (``Uason-Chen/CTR-GCN`` ``model/ctrgcn.py``, which
MMCL's ``model/MMCL.py`` reuses unchanged), rebuilt here:

* input batch norm over (persons × joints × channels), as the reference's ``data_bn``;
* ten blocks (widths 64 ×4, 128 ×3, 256 ×3; temporal stride 2 entering the 128 and 256 stages),
  each ``relu(MS-TCN(CTR-GC(x)) + residual(x))``, the first without the block residual;
* **CTR-GC**: per partition ``k`` of the graph (identity, inward, outward), a channel-wise topology
  ``tanh(φ(x̄)_u − ψ(x̄)_v)`` (x̄: the mean over time, φ, ψ 1×1 convolutions to ``in/8`` channels,
  8 for the 3-channel input) mapped to the output channels, scaled by a learnable ``α`` (0 at
  first) and added to the learnable partition adjacency ``A_k`` (initialised from the graph); the
  features ``ξ(x)`` are aggregated with it, summed over the partitions, batch-normed (scale
  initialised to 1e-6), plus a (projected) residual, ReLU;
* **MS-TCN**: four branches of ``out/4`` channels: 1×1 conv → BN → ReLU → temporal conv (kernel 5,
  dilation 1 or 2) → BN; 1×1 conv → BN → ReLU → max pool (3) → BN; 1×1 conv → BN; concatenated;
* the pooled feature is the mean over time and joints, then over persons (256-d).

The graph partitions are CTR-GCN's "spatial" ones: identity, the inward edges (towards the root)
and the outward edges, each column-normalised. Edges are oriented by hop distance from ``root``: by
default the graph centre (the joint of least eccentricity, as our ST-GCN's partition), or a joint
given by index: ``root=20`` (spine shoulder) on NTU-25 gives the reference's orientation of every
edge the two layouts share (our NTU-25 layout attaches the hand tip and the thumb to the hand, the
reference's graph chains tip → thumb → hand). Initialisation follows the reference (Kaiming
normal, fan-out, for convolutions; batch-norm scales 1, MS-TCN's drawn from N(1, 0.02)).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from mmfsar.models.base import EncoderOutput, UnmaskedBackbone
from mmfsar.models.encoders.stgcn import _hop_distances, _hops_to_centre, _validated_edges

__all__ = ["CTRGCN", "ctrgcn_partitions"]


def ctrgcn_partitions(num_joints: int, edges: Sequence[Sequence[int]], root: int | None = None) -> torch.Tensor:
    """``(3, V, V)``: identity, inward and outward adjacency, each divided by its column sums.

    ``A[k, u, v]`` weighs the message from joint ``v`` to joint ``u``: inward ``A[1, parent, child]``
    (towards ``root``, i.e. from the joint farther from it to the nearer one), outward its transpose.
    """
    checked = _validated_edges(num_joints, edges)
    dist = _hop_distances(num_joints, checked)
    if root is None:
        hops = _hops_to_centre(dist)
    else:
        if not 0 <= root < num_joints:
            raise ValueError(f"CTRGCN: root must be a joint index in 0..{num_joints - 1}, got {root}")
        hops = dist[root]
        if not torch.isfinite(hops).all():
            raise ValueError(
                f"CTRGCN: joints {torch.nonzero(~torch.isfinite(hops)).flatten().tolist()} are not connected to "
                f"root {root}"
            )
    inward = torch.zeros(num_joints, num_joints)
    for a, b in checked:
        if a == b or hops[a] == hops[b]:
            continue
        child, parent = (a, b) if hops[a] > hops[b] else (b, a)
        inward[parent, child] = 1.0

    def column_normalised(adj: torch.Tensor) -> torch.Tensor:
        degree = adj.sum(dim=0, keepdim=True)
        return torch.where(degree > 0, adj / degree.clamp(min=1), adj)

    return torch.stack([torch.eye(num_joints), column_normalised(inward), column_normalised(inward.t())])


def _conv_init(conv: nn.Conv2d) -> None:
    nn.init.kaiming_normal_(conv.weight, mode="fan_out")
    if conv.bias is not None:
        nn.init.zeros_(conv.bias)


def _bn(channels: int, scale: float = 1.0) -> nn.BatchNorm2d:
    bn = nn.BatchNorm2d(channels)
    nn.init.constant_(bn.weight, scale)
    nn.init.zeros_(bn.bias)
    return bn


class ChannelTopologyConv(nn.Module):
    """CTR-GC on one partition: ``Z = (α · T(x) + A) ⋅ ξ(x)`` with the channel-wise topology
    ``T(x)[c, u, v] = conv4(tanh(φ(x̄)_u − ψ(x̄)_v))[c]`` (x̄: mean over time)."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        rel = 8 if in_channels in (3, 9) else in_channels // 8
        self.phi = nn.Conv2d(in_channels, rel, 1)
        self.psi = nn.Conv2d(in_channels, rel, 1)
        self.xi = nn.Conv2d(in_channels, out_channels, 1)
        self.expand = nn.Conv2d(rel, out_channels, 1)
        for conv in (self.phi, self.psi, self.xi, self.expand):
            _conv_init(conv)

    def forward(self, x: torch.Tensor, adjacency: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
        q, k = self.phi(x).mean(2), self.psi(x).mean(2)  # (N, R, V)
        topology = self.expand(torch.tanh(q[..., :, None] - k[..., None, :])) * alpha + adjacency  # (N, C, V, V)
        return torch.einsum("ncuv,nctv->nctu", topology, self.xi(x))


class CTRGraphConv(nn.Module):
    """Sum of CTR-GC over the partitions, batch norm (scale 1e-6 at first), residual, ReLU."""

    def __init__(self, in_channels: int, out_channels: int, partitions: torch.Tensor) -> None:
        super().__init__()
        self.adjacency = nn.Parameter(partitions.clone())  # learnable ("adaptive" in the reference)
        self.alpha = nn.Parameter(torch.zeros(1))
        self.convs = nn.ModuleList(ChannelTopologyConv(in_channels, out_channels) for _ in range(partitions.shape[0]))
        self.bn = _bn(out_channels, 1e-6)
        if in_channels == out_channels:
            self.down: nn.Module = nn.Identity()
        else:
            self.down = nn.Sequential(nn.Conv2d(in_channels, out_channels, 1), _bn(out_channels))
            _conv_init(self.down[0])
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = sum(conv(x, self.adjacency[k], self.alpha) for k, conv in enumerate(self.convs))
        return self.relu(self.bn(y) + self.down(x))


class MultiScaleTemporalConv(nn.Module):
    """MS-TCN: dilated temporal-conv branches, a max-pool branch and a 1×1 branch, concatenated."""

    def __init__(self, channels: int, *, kernel_size: int, stride: int, dilations: Sequence[int]) -> None:
        super().__init__()
        branches = len(dilations) + 2
        if channels % branches:
            raise ValueError(f"MS-TCN: {channels} channels do not split into {branches} branches")
        width = channels // branches

        def entry() -> list[nn.Module]:
            return [nn.Conv2d(channels, width, 1), _ms_bn(width), nn.ReLU(inplace=True)]

        self.branches = nn.ModuleList(
            nn.Sequential(
                *entry(),
                nn.Conv2d(
                    width,
                    width,
                    (kernel_size, 1),
                    stride=(stride, 1),
                    padding=((kernel_size - 1) * d // 2, 0),
                    dilation=(d, 1),
                ),
                _ms_bn(width),
            )
            for d in dilations
        )
        self.branches.append(
            nn.Sequential(*entry(), nn.MaxPool2d((3, 1), stride=(stride, 1), padding=(1, 0)), _ms_bn(width))
        )
        self.branches.append(nn.Sequential(nn.Conv2d(channels, width, 1, stride=(stride, 1)), _ms_bn(width)))
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                _conv_init(m)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([branch(x) for branch in self.branches], dim=1)


def _ms_bn(channels: int) -> nn.BatchNorm2d:
    bn = nn.BatchNorm2d(channels)
    nn.init.normal_(bn.weight, 1.0, 0.02)  # the reference's weights_init for MS-TCN
    nn.init.zeros_(bn.bias)
    return bn


class CTRGCNBlock(nn.Module):
    """``relu(MS-TCN(CTR-GC(x)) + residual(x))``."""

    def __init__(
        self, in_channels: int, out_channels: int, partitions: torch.Tensor, *, stride: int, residual: bool,
        kernel_size: int, dilations: Sequence[int],
    ) -> None:  # fmt: skip
        super().__init__()
        self.gcn = CTRGraphConv(in_channels, out_channels, partitions)
        self.tcn = MultiScaleTemporalConv(out_channels, kernel_size=kernel_size, stride=stride, dilations=dilations)
        if not residual:
            self.residual: nn.Module | None = None
        elif in_channels == out_channels and stride == 1:
            self.residual = nn.Identity()
        else:
            self.residual = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride=(stride, 1)), _bn(out_channels)
            )
            _conv_init(self.residual[0])
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.tcn(self.gcn(x))
        return self.relu(y if self.residual is None else y + self.residual(x))


class CTRGCN(UnmaskedBackbone):
    """CTR-GCN on skeleton sequences ``(B, C, T, V, M)`` (M persons; ``(B, C, T, V)`` when
    ``num_persons`` is 1).

    Args:
        in_channels, num_frames, num_joints, edges: the input and the skeleton's ``[a, b]`` joint pairs
            (from the modality).
        num_persons: M (the input batch norm is per person, joint and channel, as the reference's).
        channels / temporal_strides: width and temporal stride of each block (default: the ten
            blocks of the reference, 64·4, 128·3, 256·3, strides 2 entering the 128 / 256 stages).
        kernel_size, dilations: MS-TCN's temporal kernel and dilations (5; 1, 2).
        root: joint the inward edges point to (None: the graph centre); see the module docstring.
        dropout: on the pooled feature (0 in MMCL's configs).
    """

    def __init__(
        self,
        *,
        in_channels: int,
        num_frames: int,
        num_joints: int,
        edges: Sequence[Sequence[int]],
        num_persons: int = 2,
        channels: Sequence[int] = (64, 64, 64, 64, 128, 128, 128, 256, 256, 256),
        temporal_strides: Sequence[int] = (1, 1, 1, 1, 2, 1, 1, 2, 1, 1),
        kernel_size: int = 5,
        dilations: Sequence[int] = (1, 2),
        root: int | None = None,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        channels, temporal_strides = [int(c) for c in channels], [int(s) for s in temporal_strides]
        if not channels or len(channels) != len(temporal_strides):
            raise ValueError(
                f"CTRGCN: channels {channels} and temporal_strides {temporal_strides} need the same nonzero length"
            )
        if num_persons < 1:
            raise ValueError(f"CTRGCN: num_persons must be >= 1, got {num_persons}")
        self.in_channels, self.num_frames, self.num_joints, self.num_persons = (
            in_channels,
            num_frames,
            num_joints,
            num_persons,
        )
        self.feature_dim = channels[-1]
        partitions = ctrgcn_partitions(num_joints, edges, root)
        self.data_bn = nn.BatchNorm1d(num_persons * num_joints * in_channels)
        widths = [in_channels, *channels]
        self.blocks = nn.Sequential(
            *(
                CTRGCNBlock(
                    widths[i],
                    widths[i + 1],
                    partitions,
                    stride=temporal_strides[i],
                    residual=i > 0,
                    kernel_size=kernel_size,
                    dilations=dilations,
                )
                for i in range(len(channels))
            )
        )
        self.dropout = nn.Dropout(dropout)

    def encode(self, x: torch.Tensor, *, return_tokens: bool = False) -> EncoderOutput:
        """``frames``: the mean over joints and persons per output time step (B, T', D);
        ``pooled``: their mean; ``tokens`` (if asked): (B, T'·V, D), averaged over persons."""
        if x.ndim == 4:
            x = x[..., None]
        n, c, t, v, m = x.shape
        if c != self.in_channels or v != self.num_joints or m != self.num_persons:
            raise ValueError(
                f"CTRGCN expects skeletons (B, {self.in_channels}, T, {self.num_joints}, {self.num_persons}), "
                f"got {tuple(x.shape)}"
            )
        x = self.data_bn(x.permute(0, 4, 3, 1, 2).reshape(n, m * v * c, t))  # (N, M·V·C, T)
        x = x.reshape(n, m, v, c, t).permute(0, 1, 3, 4, 2).reshape(n * m, c, t, v)
        features = self.blocks(x).unflatten(0, (n, m))  # (N, M, D, T', V)
        frames = features.mean(dim=(1, 4)).transpose(1, 2)
        tokens = features.mean(1).permute(0, 2, 3, 1).flatten(1, 2) if return_tokens else None
        return EncoderOutput(pooled=self.dropout(frames.mean(1)), frames=frames, tokens=tokens)
