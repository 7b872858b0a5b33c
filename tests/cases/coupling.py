"""Registry entries for the coupling layers (NICE additive, RealNVP affine): every mask kind,
vectors and tiny images, the complement (flip) too."""

import numpy as np
from registry import Case

import flowmath as fm

_H = (8, 8)  # small conditioners: the dense Jacobian check is brute force
_VMASK = np.array([True, False, True, True, False, False])
_IMASK = np.random.default_rng(20261129).random((2, 4, 4)) > 0.5

CASES = []
for _name, _cls in (("Affine", fm.AffineCoupling), ("Additive", fm.AdditiveCoupling)):
    CASES += [
        Case(f"{_name}Coupling-half-vec", lambda c=_cls: c(hidden=_H), (6,)),
        Case(f"{_name}Coupling-half-vec-odd-flip", lambda c=_cls: c(hidden=_H, flip=True), (5,)),
        Case(f"{_name}Coupling-array-vec", lambda c=_cls: c(_VMASK, hidden=_H), (6,)),
        Case(f"{_name}Coupling-half-img", lambda c=_cls: c(hidden=_H), (2, 4, 4)),
        Case(f"{_name}Coupling-channel-img", lambda c=_cls: c("channel", hidden=_H), (4, 4, 4)),
        Case(
            f"{_name}Coupling-checkerboard-img",
            lambda c=_cls: c("checkerboard", hidden=_H),
            (2, 4, 4),
        ),
        Case(
            f"{_name}Coupling-checkerboard-img-flip",
            lambda c=_cls: c("checkerboard", hidden=_H, flip=True),
            (1, 4, 4),
        ),
        Case(f"{_name}Coupling-array-img", lambda c=_cls: c(_IMASK, hidden=_H), (2, 4, 4)),
        # h != w (and odd): height and width must not be interchangeable anywhere
        Case(
            f"{_name}Coupling-checkerboard-img-3x4",
            lambda c=_cls: c("checkerboard", hidden=_H),
            (2, 3, 4),
        ),
        Case(f"{_name}Coupling-channel-img-2x3", lambda c=_cls: c("channel", hidden=_H), (2, 2, 3)),
    ]
# the default constructor must give a working layer (DESIGN 2.1)
CASES.append(Case("AffineCoupling-default", fm.AffineCoupling, (6,)))
CASES.append(Case("AdditiveCoupling-default", fm.AdditiveCoupling, (4,)))
