"""Toy 2-D densities of the FFJORD experiments, each drawn from an explicit ``rng``.

The shapes, scales and noise levels follow FFJORD's ``lib/toy_data.py`` (Grathwohl et al. 2019,
arXiv:1810.01367), re-implemented so that every draw comes from a ``numpy.random.Generator``
passed in (the original mixes a ``RandomState`` argument with NumPy's global state and
scikit-learn's generators). The best achievable test NLL (the entropy) and the NLL of a
full-covariance Gaussian quoted in ``docs/theory.rst`` therefore apply to these samplers.

One difference is deliberate: FFJORD's ``rings``, ``circles``, ``moons`` and ``pinwheel`` place
their points *stratified* (evenly spaced angles, equal numbers per component). Here every sample
is an independent draw from the same mixture density (component and angle drawn at random), so a
batch is an i.i.d. sample — what a density estimator and a statistical test assume.

=================  ======================================================================
name               density (before the final scaling shown)
=================  ======================================================================
``8gaussians``     8 equal Gaussians (std 0.5) centred at 4 (cos k pi/4, sin k pi/4); / 1.414
``pinwheel``       5 arms: radial r ~ N(1, 0.3^2), tangential t ~ N(0, 0.1^2), point
                   rotated by -(2 pi k/5 + exp(r)/4); x 2
``swissroll``      t = 1.5 pi (1 + 2U); (t cos t, t sin t) + N(0, I); / 5
``circles``        radius 1 or 0.5 (prob. 1/2 each), uniform angle, + N(0, 0.08^2 I); x 3
``moons``          scikit-learn's two moons + N(0, 0.1^2 I); x 2 + (-1, -0.2)
``rings``          radius 3, 2.25, 1.5 or 0.75 (prob. 1/4 each), uniform angle, + N(0, 0.08^2 I)
``2spirals``       n = 3 pi sqrt(U); +-(-n cos n + U'/2, n sin n + U''/2) / 3 + N(0, 0.1^2 I)
``checkerboard``   uniform on the 8 dark 2 x 2 squares of a checkerboard on [-4, 4]^2
=================  ======================================================================

Use :func:`toy` with one of :data:`TOY_NAMES`, or the per-name functions (whose names are valid
identifiers: ``8gaussians`` is :func:`eight_gaussians`, ``2spirals`` is :func:`two_spirals`).
"""

from __future__ import annotations

import math

import numpy as np

from .._checks import check_choice, check_float_dtype, check_int, check_rng

__all__ = [
    "TOY_NAMES",
    "checkerboard",
    "circles",
    "eight_gaussians",
    "moons",
    "pinwheel",
    "rings",
    "swissroll",
    "toy",
    "two_spirals",
]

TOY_NAMES = (
    "8gaussians",
    "pinwheel",
    "swissroll",
    "circles",
    "moons",
    "rings",
    "2spirals",
    "checkerboard",
)


def _prepare(n, rng, dtype):
    n = check_int(n, "n", minimum=1)
    check_rng(rng)
    return n, check_float_dtype(dtype)


def _on_circle(radius, angle):
    return np.stack([radius * np.cos(angle), radius * np.sin(angle)], axis=1)


def eight_gaussians(n: int, rng: np.random.Generator, *, dtype=np.float64) -> np.ndarray:
    """``8gaussians``: an equal mixture of 8 isotropic Gaussians on a circle.

    .. math:: x = (c_k + 0.5\\,\\varepsilon) / 1.414, \\quad
        c_k = 4(\\cos\\tfrac{k\\pi}{4}, \\sin\\tfrac{k\\pi}{4}),\\ k \\sim U\\{0..7\\},\\
        \\varepsilon \\sim N(0, I_2).

    (FFJORD divides by the literal 1.414, not :math:`\\sqrt 2`; kept so its numbers apply.)

    Parameters
    ----------
    n : int
        Number of samples.
    rng : numpy.random.Generator
        Source of every random draw.
    dtype : float32 or float64

    Returns
    -------
    ndarray, shape (n, 2)

    References
    ----------
    Grathwohl et al. (2019), FFJORD, arXiv:1810.01367 (code: ``lib/toy_data.py``).

    Examples
    --------
    >>> import numpy as np
    >>> from flowmath.data import eight_gaussians
    >>> eight_gaussians(5, np.random.default_rng(0)).shape
    (5, 2)
    """
    n, dtype = _prepare(n, rng, dtype)
    k = rng.integers(0, 8, size=n)
    centres = _on_circle(4.0, k * (math.pi / 4))
    x = (centres + 0.5 * rng.standard_normal((n, 2))) / 1.414
    return x.astype(dtype, copy=False)


def pinwheel(n: int, rng: np.random.Generator, *, dtype=np.float64) -> np.ndarray:
    """``pinwheel``: five curved arms.

    .. math:: r \\sim N(1, 0.3^2),\\ t \\sim N(0, 0.1^2),\\
        a = \\tfrac{2\\pi k}{5} + \\tfrac14 e^{r},\\
        x = 2\\,(r\\cos a + t \\sin a,\\ -r \\sin a + t\\cos a),\\ k \\sim U\\{0..4\\}.

    Parameters and return as in :func:`eight_gaussians`.

    References
    ----------
    Grathwohl et al. (2019), FFJORD, arXiv:1810.01367; the pinwheel of Johnson et al. (2016),
    arXiv:1603.06277.
    """
    n, dtype = _prepare(n, rng, dtype)
    k = rng.integers(0, 5, size=n)
    r = 1.0 + 0.3 * rng.standard_normal(n)
    t = 0.1 * rng.standard_normal(n)
    a = 2 * math.pi * k / 5 + 0.25 * np.exp(r)
    c, s = np.cos(a), np.sin(a)
    x = 2.0 * np.stack([r * c + t * s, -r * s + t * c], axis=1)
    return x.astype(dtype, copy=False)


def swissroll(n: int, rng: np.random.Generator, *, dtype=np.float64) -> np.ndarray:
    """``swissroll``: the (x, z) plane of scikit-learn's Swiss roll with unit noise, over 5.

    .. math:: t = 1.5\\pi(1 + 2U),\\
        x = (t\\cos t + \\varepsilon_1,\\ t \\sin t + \\varepsilon_2)/5.

    Parameters and return as in :func:`eight_gaussians`.

    References
    ----------
    Grathwohl et al. (2019), FFJORD, arXiv:1810.01367; Marsland (2009), *Machine Learning: an
    Algorithmic Perspective* (``sklearn.datasets.make_swiss_roll``).
    """
    n, dtype = _prepare(n, rng, dtype)
    t = 1.5 * math.pi * (1.0 + 2.0 * rng.uniform(size=n))
    x = (np.stack([t * np.cos(t), t * np.sin(t)], axis=1) + rng.standard_normal((n, 2))) / 5.0
    return x.astype(dtype, copy=False)


def circles(n: int, rng: np.random.Generator, *, dtype=np.float64) -> np.ndarray:
    """``circles``: two concentric noisy circles of radii 3 and 1.5.

    .. math:: x = 3\\,(\\rho(\\cos\\theta, \\sin\\theta) + 0.08\\,\\varepsilon),\\
        \\rho \\in \\{1, 0.5\\},\\ \\theta \\sim U[0, 2\\pi).

    Parameters and return as in :func:`eight_gaussians`.

    References
    ----------
    Grathwohl et al. (2019), FFJORD, arXiv:1810.01367 (``make_circles(factor=.5, noise=.08)``).
    """
    n, dtype = _prepare(n, rng, dtype)
    radius = np.where(rng.uniform(size=n) < 0.5, 1.0, 0.5)
    theta = rng.uniform(0.0, 2 * math.pi, size=n)
    x = 3.0 * (_on_circle(radius, theta) + 0.08 * rng.standard_normal((n, 2)))
    return x.astype(dtype, copy=False)


def moons(n: int, rng: np.random.Generator, *, dtype=np.float64) -> np.ndarray:
    """``moons``: two interleaved half circles.

    .. math:: m = (\\cos\\theta, \\sin\\theta)\\ \\text{or}\\
        (1 - \\cos\\theta, \\tfrac12 - \\sin\\theta),\\
        \\theta \\sim U[0, \\pi];\\quad x = 2(m + 0.1\\,\\varepsilon) + (-1, -0.2).

    Parameters and return as in :func:`eight_gaussians`.

    References
    ----------
    Grathwohl et al. (2019), FFJORD, arXiv:1810.01367 (``make_moons(noise=0.1)``).
    """
    n, dtype = _prepare(n, rng, dtype)
    theta = rng.uniform(0.0, math.pi, size=n)
    upper = rng.uniform(size=n) < 0.5
    c, s = np.cos(theta), np.sin(theta)
    m = np.where(upper[:, None], np.stack([c, s], 1), np.stack([1.0 - c, 0.5 - s], 1))
    x = 2.0 * (m + 0.1 * rng.standard_normal((n, 2))) + np.array([-1.0, -0.2])
    return x.astype(dtype, copy=False)


def rings(n: int, rng: np.random.Generator, *, dtype=np.float64) -> np.ndarray:
    """``rings``: four concentric noisy circles of radii 3, 2.25, 1.5, 0.75.

    .. math:: x = 3\\rho(\\cos\\theta, \\sin\\theta) + 0.08\\,\\varepsilon,\\
        \\rho \\in \\{1, \\tfrac34, \\tfrac12, \\tfrac14\\},\\ \\theta \\sim U[0, 2\\pi).

    Parameters and return as in :func:`eight_gaussians`.

    References
    ----------
    Grathwohl et al. (2019), FFJORD, arXiv:1810.01367.
    """
    n, dtype = _prepare(n, rng, dtype)
    radius = 0.75 * rng.integers(1, 5, size=n)
    theta = rng.uniform(0.0, 2 * math.pi, size=n)
    x = _on_circle(radius, theta) + 0.08 * rng.standard_normal((n, 2))
    return x.astype(dtype, copy=False)


def two_spirals(n: int, rng: np.random.Generator, *, dtype=np.float64) -> np.ndarray:
    """``2spirals``: two interleaved spirals (the second the point reflection of the first).

    .. math:: s = 3\\pi\\sqrt{U},\\ d = (-s\\cos s + U'/2,\\ s\\sin s + U''/2),\\
        x = \\pm d / 3 + 0.1\\,\\varepsilon.

    Parameters and return as in :func:`eight_gaussians`.

    References
    ----------
    Grathwohl et al. (2019), FFJORD, arXiv:1810.01367.
    """
    n, dtype = _prepare(n, rng, dtype)
    s = 3 * math.pi * np.sqrt(rng.uniform(size=n))
    jitter = 0.5 * rng.uniform(size=(n, 2))
    d = np.stack([-s * np.cos(s), s * np.sin(s)], axis=1) + jitter
    sign = np.where(rng.uniform(size=n) < 0.5, 1.0, -1.0)[:, None]
    x = sign * d / 3.0 + 0.1 * rng.standard_normal((n, 2))
    return x.astype(dtype, copy=False)


def checkerboard(n: int, rng: np.random.Generator, *, dtype=np.float64) -> np.ndarray:
    """``checkerboard``: uniform on 8 of the 16 unit-2 squares of [-4, 4]^2 (entropy ln 32).

    .. math:: a \\sim U[-2, 2),\\ b = U - 2B + (\\lfloor a \\rfloor \\bmod 2),\\ B \\sim
        \\mathrm{Bernoulli}(\\tfrac12);\\quad x = 2(a, b).

    Parameters and return as in :func:`eight_gaussians`.

    References
    ----------
    Grathwohl et al. (2019), FFJORD, arXiv:1810.01367.
    """
    n, dtype = _prepare(n, rng, dtype)
    a = rng.uniform(-2.0, 2.0, size=n)
    b = rng.uniform(size=n) - 2.0 * rng.integers(0, 2, size=n) + np.floor(a) % 2
    x = 2.0 * np.stack([a, b], axis=1)
    return x.astype(dtype, copy=False)


_SAMPLERS = {
    "8gaussians": eight_gaussians,
    "pinwheel": pinwheel,
    "swissroll": swissroll,
    "circles": circles,
    "moons": moons,
    "rings": rings,
    "2spirals": two_spirals,
    "checkerboard": checkerboard,
}


def toy(name: str, n: int, rng: np.random.Generator, *, dtype=np.float64) -> np.ndarray:
    """``n`` i.i.d. samples of the toy 2-D density ``name`` (one of :data:`TOY_NAMES`).

    Parameters
    ----------
    name : str
        ``"8gaussians"``, ``"pinwheel"``, ``"swissroll"``, ``"circles"``, ``"moons"``,
        ``"rings"``, ``"2spirals"`` or ``"checkerboard"``.
    n : int
        Number of samples (>= 1).
    rng : numpy.random.Generator
        Source of every random draw (no global state is touched).
    dtype : float32 or float64

    Returns
    -------
    ndarray, shape (n, 2)

    References
    ----------
    Grathwohl et al. (2019), FFJORD: Free-form continuous dynamics for scalable reversible
    generative models, arXiv:1810.01367.

    Examples
    --------
    >>> import numpy as np
    >>> from flowmath.data import toy
    >>> x = toy("checkerboard", 1000, np.random.default_rng(0))
    >>> x.shape, bool(np.all(np.abs(x) <= 4))
    ((1000, 2), True)
    """
    check_choice(name, "name", TOY_NAMES)
    return _SAMPLERS[name](n, rng, dtype=dtype)
