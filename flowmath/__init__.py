"""flowmath: the mathematics of normalizing flows, verified numerically.

Public names only; see ``docs/design.rst`` (the public contract) for the contract.
"""

from . import data, dequantize, estimators, lipschitz, models, nets, ode, testing, train
from .distributions import Flow, StandardLogistic, StandardNormal
from .layers import (
    CNF,
    ELU,
    IAF,
    MAF,
    ActNorm,
    AdditiveCoupling,
    AffineCoupling,
    Bijection,
    BlockDiagonalLinear,
    Chain,
    DiagonalLinear,
    EmergingConv2d,
    FullLinear,
    Glow,
    GlowStep,
    InvConv1x1,
    IResBlock,
    LeakyReLU,
    Logit,
    LULinear,
    PeriodicConv2d,
    Sigmoid,
    Squeeze,
    TriangularLinear,
)
from .ode import odeint

__version__ = "0.1.0"

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
    "Flow",
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
    "StandardLogistic",
    "StandardNormal",
    "TriangularLinear",
    "data",
    "dequantize",
    "estimators",
    "lipschitz",
    "models",
    "nets",
    "ode",
    "odeint",
    "testing",
    "train",
]
