"""ST-GCN over a dataset's own skeleton (joints and edges come from its ``meta.json``).

The graph uses ST-GCN's *spatial* partition (Yan et al., 2018): for each joint, its neighbours
are split into the joint itself (plus neighbours as far from the centre as itself), neighbours
closer to the skeleton's centre (centripetal) and neighbours farther from it (centrifugal), each
group with its own weights. The centre is found from the graph (the joint of least eccentricity
in each connected component), so no joint list has to be annotated by hand.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from mmfsar.models.base import EncoderOutput, UnmaskedBackbone


def _validated_edges(num_joints: int, edges: Sequence[Sequence[int]]) -> list[tuple[int, int]]:
    checked = []
    for index, edge in enumerate(edges):
        pair = tuple(int(j) for j in edge)
        if len(pair) != 2 or not all(0 <= j < num_joints for j in pair):
            raise ValueError(
                f"edge #{index} {list(pair)} must be two joint indices in "
                f"0..{num_joints - 1} ({num_joints} joints)"
            )
        checked.append(pair)
    return checked


def _hop_distances(num_joints: int, edges: Sequence[tuple[int, int]]) -> torch.Tensor:
    """All-pairs shortest path lengths in hops (inf between disconnected joints)."""
    dist = torch.full((num_joints, num_joints), float("inf"))
    dist.fill_diagonal_(0)
    for a, b in edges:
        if a != b:
            dist[a, b] = dist[b, a] = 1
    for k in range(num_joints):
        dist = torch.minimum(dist, dist[:, k : k + 1] + dist[k : k + 1, :])
    return dist


def _hops_to_centre(dist: torch.Tensor) -> torch.Tensor:
    """Distance of every joint to the centre of its connected component."""
    hops = torch.empty(dist.shape[0])
    unassigned = torch.ones(dist.shape[0], dtype=torch.bool)
    while unassigned.any():
        first = int(unassigned.nonzero()[0])
        component = dist[first].isfinite().nonzero().flatten()
        eccentricity = dist[component][:, component].max(dim=1).values
        centre = component[eccentricity.argmin()]
        hops[component] = dist[centre, component]
        unassigned[component] = False
    return hops


def spatial_partition_adjacency(num_joints: int, edges: Sequence[Sequence[int]]) -> torch.Tensor:
    """``(3, J, J)`` normalised adjacency: [self/same-distance, centripetal, centrifugal].

    ``A[k, v, w]`` weighs the message from joint ``v`` to joint ``w``; the full adjacency with
    self-loops is normalised by each receiving joint's degree (``A D^-1``, as ST-GCN) before
    being split, so the three parts together average over the neighbourhood.
    """
    checked = _validated_edges(num_joints, edges)
    dist = _hop_distances(num_joints, checked)
    adjacency = (dist <= 1).float()
    normalised = adjacency / adjacency.sum(dim=0, keepdim=True)
    hops = _hops_to_centre(dist)
    closer = hops[:, None] < hops[None, :]
    farther = hops[:, None] > hops[None, :]
    same = ~(closer | farther)
    return torch.stack([normalised * same, normalised * closer, normalised * farther])


class GraphConv(nn.Module):
    """Spatial graph convolution: a 1x1 conv per partition, aggregated along the graph.

    The adjacency is multiplied by a learned edge importance (ST-GCN), initialised to one.
    """

    def __init__(self, in_channels: int, out_channels: int, adjacency: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("adjacency", adjacency.clone())
        self.edge_importance = nn.Parameter(torch.ones_like(adjacency))
        self.conv = nn.Conv2d(in_channels, out_channels * adjacency.shape[0], kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, _, time, joints = x.shape
        y = self.conv(x).view(batch, self.adjacency.shape[0], -1, time, joints)
        return torch.einsum("nkctv,kvw->nctw", y, self.adjacency * self.edge_importance)


class STGCNBlock(nn.Module):
    """Graph conv -> BN -> ReLU -> temporal conv (strided) -> BN -> dropout, plus a residual."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        adjacency: torch.Tensor,
        *,
        temporal_kernel: int,
        stride: int,
        dropout: float,
    ) -> None:
        super().__init__()
        self.gcn = GraphConv(in_channels, out_channels, adjacency)
        self.tcn = nn.Sequential(
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
            nn.Conv2d(
                out_channels,
                out_channels,
                kernel_size=(temporal_kernel, 1),
                stride=(stride, 1),
                padding=((temporal_kernel - 1) // 2, 0),
            ),
            nn.BatchNorm2d(out_channels),
            nn.Dropout(dropout),
        )
        if in_channels == out_channels and stride == 1:
            self.residual: nn.Module = nn.Identity()
        else:
            self.residual = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, kernel_size=1, stride=(stride, 1)),
                nn.BatchNorm2d(out_channels),
            )
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.tcn(self.gcn(x)) + self.residual(x))


class STGCN(UnmaskedBackbone):
    """Spatial-temporal graph convolutional network on keypoint sequences.

    Args:
        in_channels, num_frames, num_joints, edges: input ``(B, in_channels, num_frames,
            num_joints)`` and the skeleton's ``[a, b]`` joint pairs (undirected).
        channels: width of each block; the last is ``feature_dim``.
        temporal_strides: temporal stride of each block (same length as ``channels``).
        temporal_kernel: odd temporal kernel size of every block.
        dropout: after each temporal convolution.

    ``frames`` are the joint-averaged features of each output time step (``T' = T / prod
    strides``, rounded up); a 5-D input ``(B, C, T, J, M)`` (NTU layout, M persons) is encoded
    person by person and averaged over persons.
    """

    def __init__(
        self,
        *,
        in_channels: int,
        num_frames: int,
        num_joints: int,
        edges: Sequence[Sequence[int]],
        channels: Sequence[int] = (32, 64, 128),
        temporal_strides: Sequence[int] = (1, 2, 2),
        temporal_kernel: int = 5,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        channels = [int(c) for c in channels]
        temporal_strides = [int(s) for s in temporal_strides]
        if not channels or len(channels) != len(temporal_strides):
            raise ValueError(
                f"channels {channels} and temporal_strides {temporal_strides} "
                "need the same nonzero length"
            )
        if temporal_kernel % 2 == 0:
            raise ValueError(f"temporal_kernel must be odd, got {temporal_kernel}")
        self.in_channels = in_channels
        self.num_frames = num_frames
        self.num_joints = num_joints
        self.feature_dim = channels[-1]
        adjacency = spatial_partition_adjacency(num_joints, edges)
        self.data_bn = nn.BatchNorm1d(in_channels * num_joints)
        widths = [in_channels, *channels]
        self.blocks = nn.Sequential(
            *(
                STGCNBlock(
                    widths[i],
                    widths[i + 1],
                    adjacency,
                    temporal_kernel=temporal_kernel,
                    stride=temporal_strides[i],
                    dropout=dropout,
                )
                for i in range(len(channels))
            )
        )

    def encode(self, x: torch.Tensor, *, return_tokens: bool = False) -> EncoderOutput:
        """Encode ``(B, C, T, J)`` keypoints; ``tokens`` (if asked) are ``(B, T'*J, D)`` joints."""
        if x.ndim not in (4, 5) or x.shape[1] != self.in_channels or x.shape[3] != self.num_joints:
            raise ValueError(
                f"STGCN expects keypoints (B, {self.in_channels}, T, {self.num_joints}) "
                f"or (B, {self.in_channels}, T, {self.num_joints}, M), got {tuple(x.shape)}"
            )
        persons = x.shape[4] if x.ndim == 5 else 1
        if x.ndim == 5:
            x = x.permute(0, 4, 1, 2, 3).flatten(0, 1)
        batch, channels, time, joints = x.shape
        x = self.data_bn(x.permute(0, 3, 1, 2).reshape(batch, joints * channels, time))
        x = x.reshape(batch, joints, channels, time).permute(0, 2, 3, 1)
        features = self.blocks(x)  # (B*M, D, T', J)
        features = features.unflatten(0, (-1, persons))
        frames = features.mean(dim=(1, 4)).transpose(1, 2)
        tokens = None
        if return_tokens:
            tokens = features.permute(0, 1, 3, 4, 2).flatten(1, 3)
        return EncoderOutput(pooled=frames.mean(dim=1), frames=frames, tokens=tokens)
