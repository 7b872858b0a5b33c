"""Invertible layers with tractable log-determinants (the layer contract, docs/design.rst)."""

from .autoregressive import IAF, MAF
from .base import Bijection, Chain
from .continuous import CNF
from .conv import EmergingConv2d, InvConv1x1, PeriodicConv2d
from .coupling import AdditiveCoupling, AffineCoupling
from .elementwise import ELU, LeakyReLU, Logit, Sigmoid
from .glow import ActNorm, Glow, GlowStep, Squeeze
from .linear import BlockDiagonalLinear, DiagonalLinear, FullLinear, LULinear, TriangularLinear
from .residual import IResBlock

__all__ = [
    "CNF",
    "ELU",
    "ActNorm",
    "AdditiveCoupling",
    "AffineCoupling",
    "Bijection",
    "BlockDiagonalLinear",
    "Chain",
    "DiagonalLinear",
    "EmergingConv2d",
    "FullLinear",
    "Glow",
    "GlowStep",
    "IAF",
    "IResBlock",
    "InvConv1x1",
    "LULinear",
    "LeakyReLU",
    "Logit",
    "MAF",
    "PeriodicConv2d",
    "Sigmoid",
    "Squeeze",
    "TriangularLinear",
]
