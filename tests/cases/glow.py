"""Registry entries for Glow's layers: ActNorm (vectors and images), Squeeze, a flow step and
the multi-scale model on tiny images."""

from registry import Case

import flowmath as fm

CASES = [
    Case("ActNorm-vec", fm.ActNorm, (6,)),
    Case("ActNorm-img", fm.ActNorm, (2, 4, 4)),
    # h != w: a formula that mixes up height and width (h * h for h * w) fails only here
    Case("ActNorm-img-3x5", fm.ActNorm, (2, 3, 5)),
    Case("Squeeze", fm.Squeeze, (2, 4, 4), grads=False),  # no parameters
    Case("Squeeze-2x6", fm.Squeeze, (1, 2, 6), grads=False),
    Case("GlowStep", lambda: fm.GlowStep(hidden=(8,)), (4, 4, 4)),
    Case("GlowStep-plain", lambda: fm.GlowStep(hidden=(8,), lu=False), (2, 4, 4)),
    Case("GlowStep-2x4", lambda: fm.GlowStep(hidden=(4,)), (2, 2, 4)),
    Case("Glow-2x4x6-L1", lambda: fm.Glow(levels=1, steps=1, hidden=(4,)), (2, 4, 6)),
    Case("Glow-2x4x4-L2", lambda: fm.Glow(levels=2, steps=1, hidden=(8,)), (2, 4, 4)),
    Case(
        "Glow-2x4x4-L2-prior",
        lambda: fm.Glow(levels=2, steps=1, hidden=(4,), split_prior=True),
        (2, 4, 4),
    ),
    Case("Glow-1x2x2-L1K2", lambda: fm.Glow(levels=1, steps=2, hidden=(4, 4)), (1, 2, 2)),
]
