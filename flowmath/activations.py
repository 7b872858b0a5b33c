"""The hidden-layer activations of every network in flowmath, in one table.

Each entry of :data:`ACTIVATIONS` is an :class:`Activation`: the function :math:`\\phi`, its
derivative :math:`\\phi'` (and :math:`\\phi''` where :math:`\\phi` is twice continuously
differentiable), :math:`\\phi'` written in terms of the *output* :math:`y = \\phi(x)` where such
a form exists (the fused VJPs keep only ``y``), an upper bound on the Lipschitz constant
:math:`\\mathrm{Lip}(\\phi) = \\sup_x |\\phi'(x)|`, and the integer code under which the numba
kernels know it. Layers validate their ``activation=`` argument with :func:`check_activation`,
naming the subset their fused code supports.

.. list-table::
   :header-rows: 1

   * - name
     - :math:`\\phi(x)`
     - :math:`\\phi'(x)`
     - Lip
     - code
   * - relu
     - :math:`\\max(x, 0)`
     - :math:`[x > 0]`
     - 1
     - 0
   * - tanh
     - :math:`\\tanh x`
     - :math:`1 - \\tanh^2 x`
     - 1
     - 1
   * - softplus
     - :math:`\\log(1 + e^x)`
     - :math:`\\sigma(x)`
     - 1
     - 2
   * - elu
     - :math:`x` for x > 0, :math:`e^x - 1` else
     - :math:`1` for x > 0, :math:`e^x` else
     - 1
     - 3
   * - lipswish
     - :math:`x\\,\\sigma(x) / 1.1`
     - see :func:`lipswish`
     - 1
     - 4

with :math:`\\sigma(x) = 1/(1 + e^{-x})`. The Lipschitz constants, derived from the derivatives:

* relu: :math:`\\phi' \\in \\{0, 1\\}`, so :math:`\\mathrm{Lip} = 1`.
* tanh: :math:`\\phi' = 1 - \\tanh^2 x \\in (0, 1]`, maximal at 0: :math:`\\mathrm{Lip} = 1`.
* softplus: :math:`\\phi' = \\sigma(x) \\in (0, 1)`, supremum 1 as :math:`x \\to \\infty`.
* elu (``alpha = 1``): :math:`\\phi' = 1` for ``x > 0`` and :math:`e^x \\in (0, 1]` for
  ``x <= 0``: :math:`\\mathrm{Lip} = 1` (:math:`\\max(1, \\alpha)` for a general ``alpha``;
  Clevert et al. 2016).
* lipswish: :math:`\\phi'(x) = \\sigma(x)(1 + x(1 - \\sigma(x)))/1.1`; the bracket's maximum is
  1.0998393 at :math:`x = 2.39936` and its minimum -0.0998393 at :math:`x = -2.39936`, so
  :math:`\\sup|\\phi'| = 0.9998539`; the table keeps Chen et al.'s bound 1 (the divisor 1.1 was
  chosen to make it hold), which the i-ResNet certificates multiply in.

Backends: ``fn``, ``derivative`` and ``second_derivative`` are written against
:func:`flowmath._xp.array_namespace`, so they run on NumPy, on autograd tracers (they are
differentiable, to any order) and on CuPy or another array-API namespace (tested on
array-api-strict). For NumPy arrays and tracers :func:`relu` is ``x * (x > 0)`` and
:func:`tanh` an autograd primitive whose VJP is taken from the output (the fast paths).
:func:`flowmath.kernels.cnf_tanh.tanh` is a faster kernel for the same function that the ODE
dynamics use on NumPy.

References
----------
Clevert, Unterthiner & Hochreiter, "Fast and accurate deep network learning by exponential
linear units (ELUs)", 2016, arXiv:1511.07289.
Chen, Behrmann, Duvenaud & Jacobsen, "Residual flows for invertible generative modeling",
2019, arXiv:1906.02735 (LipSwish, Sec. 4).
Dugas, Bengio, Belisle, Nadeau & Garcia, "Incorporating second-order functional knowledge for
better option pricing", NeurIPS 2000 (softplus).

Examples
--------
>>> import numpy as np
>>> from flowmath import activations
>>> act = activations.get("tanh")
>>> act.lipschitz, act.code
(1.0, 1)
>>> x = np.array([-1.0, 0.0, 2.0])
>>> bool(np.allclose(act.derivative(x), 1 - np.tanh(x) ** 2))
True
>>> activations.get("swish")
Traceback (most recent call last):
...
ValueError: `activation` must be one of 'elu', 'lipswish', 'relu', 'softplus', 'tanh'; got 'swish'
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np
from autograd.extend import defvjp, primitive
from autograd.tracer import Box

from ._xp import array_namespace

__all__ = [
    "ACTIVATIONS",
    "LIPSWISH_SCALE",
    "Activation",
    "check_activation",
    "elu",
    "elu_derivative",
    "get",
    "lipswish",
    "lipswish_derivative",
    "relu",
    "relu_derivative",
    "softplus",
    "softplus_derivative",
    "tanh",
    "tanh_derivative",
]


@dataclasses.dataclass(frozen=True)
class Activation:
    """One activation: the function and what the fused code and the certificates need.

    Attributes
    ----------
    name : str
    fn : callable
        :math:`\\phi(x)`, elementwise, dtype-preserving.
    derivative : callable
        :math:`\\phi'(x)`.
    second_derivative : callable or None
        :math:`\\phi''(x)` where :math:`\\phi \\in C^2` (None for relu and elu, whose
        derivative jumps at 0).
    derivative_from_output : callable or None
        :math:`\\phi'` as a function of :math:`y = \\phi(x)` (None where :math:`\\phi` is not
        invertible, lipswish).
    lipschitz : float
        An upper bound on :math:`\\sup_x |\\phi'(x)|` (the module docstring derives each).
    code : int
        The integer the numba kernels dispatch on.
    """

    name: str
    fn: Callable
    derivative: Callable
    second_derivative: Callable | None
    derivative_from_output: Callable | None
    lipschitz: float
    code: int

    def __call__(self, x):
        return self.fn(x)


#: What NumPy's own functions take directly (arrays, scalars, autograd tracers).
_HOST = (np.ndarray, np.generic, Box, float, int)


def _sigmoid(xp, z):
    # 0.5 (1 + tanh(z/2)): stable for all z, no overflow warning
    return 0.5 * (1.0 + xp.tanh(0.5 * z))


def _step(xp, cond, like):
    """1 where ``cond``, else 0, in the dtype of ``like`` (no float-bool arithmetic)."""
    return xp.where(cond, xp.ones_like(like), xp.zeros_like(like))


# -- relu -----------------------------------------------------------------------------------------
def relu(x):
    """``max(x, 0)`` written as ``x * (x > 0)`` for NumPy arrays and tracers: its VJP is one
    multiplication by a mask (and the derivative at 0 is 0); ``where(x > 0, x, 0)`` on other
    namespaces (a strict array-API namespace refuses the float-bool product)."""
    if isinstance(x, _HOST):
        return x * (x > 0)
    xp = array_namespace(x)
    return xp.where(x > 0, x, xp.zeros_like(x))


def relu_derivative(x):
    """:math:`[x > 0]` in the dtype of ``x``."""
    xp = array_namespace(x)
    return _step(xp, x > 0, x)


# -- tanh -----------------------------------------------------------------------------------------
@primitive
def _tanh_np(x):
    return np.tanh(x)


defvjp(_tanh_np, lambda ans, x: lambda g: g * (1.0 - ans * ans))


def tanh(x):
    """``tanh(x)`` whose derivative is taken from the output, :math:`1 - \\tanh^2 x`.

    autograd's own VJP, ``g / cosh(x)**2``, overflows (a warning, and 0 * inf hazards) once
    ``|x| > 89`` in float32 and costs a ``cosh``; this one is bounded and cheaper. Arrays of
    other namespaces (CuPy, array-API) use their own ``tanh``.
    """
    if isinstance(x, _HOST):
        return _tanh_np(x)
    return array_namespace(x).tanh(x)


def tanh_derivative(x):
    """:math:`1 - \\tanh^2 x`."""
    h = tanh(x)
    return 1.0 - h * h


def _tanh_second(x):
    h = tanh(x)
    return -2.0 * h * (1.0 - h * h)


# -- softplus -------------------------------------------------------------------------------------
def softplus(x):
    """:math:`\\log(1 + e^x)` as ``logaddexp(0, x)`` (no overflow for large ``x``)."""
    xp = array_namespace(x)
    return xp.logaddexp(0.0, x)


def softplus_derivative(x):
    """:math:`\\sigma(x) = 1/(1 + e^{-x})`."""
    return _sigmoid(array_namespace(x), x)


def _softplus_second(x):
    s = _sigmoid(array_namespace(x), x)
    return s * (1.0 - s)


def _softplus_from_output(y):
    # sigma(x) = 1 - e^{-softplus(x)}
    return -array_namespace(y).expm1(-y)


# -- elu ------------------------------------------------------------------------------------------
def elu(x, alpha: float = 1.0):
    """ELU, :math:`\\phi(x) = x` for ``x > 0`` and :math:`\\alpha(e^x - 1)` otherwise;
    Lipschitz constant :math:`\\max(1, \\alpha)` (1 for the default)."""
    xp = array_namespace(x)
    neg = xp.minimum(x, 0.0)  # keep exp away from large positive inputs
    return xp.where(x > 0, x, alpha * xp.expm1(neg))


def elu_derivative(x, alpha: float = 1.0):
    """:math:`\\phi'(x) = 1` for ``x > 0`` and :math:`\\alpha e^x` otherwise."""
    xp = array_namespace(x)
    return xp.where(x > 0, 1.0, alpha * xp.exp(xp.minimum(x, 0.0)))


def _elu_from_output(y):
    # x <= 0: phi' = e^x = y + 1 (alpha = 1)
    xp = array_namespace(y)
    return xp.where(y > 0, 1.0, y + 1.0)


# -- lipswish -------------------------------------------------------------------------------------
#: LipSwish's divisor: max_z d/dz [z sigmoid(z)] = 1.0998393... < 1.1 (Chen et al. 2019).
LIPSWISH_SCALE = 1.1


def lipswish(x, beta: float = 1.0):
    """LipSwish (Chen et al. 2019), :math:`\\phi(x) = x\\,\\sigma(\\beta x) / 1.1`.

    Its derivative :math:`[\\sigma(z) + z\\sigma(z)(1 - \\sigma(z))]/1.1` with
    :math:`z = \\beta x` lies in :math:`[-0.0907630, 0.9998539]` for every :math:`\\beta > 0`
    (the maximum of :math:`\\sigma(z)(1 + z(1-\\sigma(z)))` is 1.0998393 at :math:`z \\approx
    2.39936`), so :math:`\\mathrm{Lip}(\\phi) \\le 1`.
    """
    xp = array_namespace(x)
    return x * _sigmoid(xp, beta * x) / LIPSWISH_SCALE


def lipswish_derivative(x, beta: float = 1.0):
    """:math:`\\phi'(x) = [s + \\beta x s (1 - s)] / 1.1`, :math:`s = \\sigma(\\beta x)`."""
    xp = array_namespace(x)
    s = _sigmoid(xp, beta * x)
    return (s + beta * x * s * (1.0 - s)) / LIPSWISH_SCALE


def _lipswish_second(x, beta: float = 1.0):
    # d/dx [s + b x s(1-s)] = b s(1-s) [2 + b x (1 - 2 s)]
    xp = array_namespace(x)
    s = _sigmoid(xp, beta * x)
    return beta * s * (1.0 - s) * (2.0 + beta * x * (1.0 - 2.0 * s)) / LIPSWISH_SCALE


def _relu_from_output(y):
    return _step(array_namespace(y), y > 0, y)


def _tanh_from_output(y):
    return 1.0 - y * y


_A = Activation
#: name -> :class:`Activation`, sorted by name.
ACTIVATIONS: dict[str, Activation] = {
    "elu": _A("elu", elu, elu_derivative, None, _elu_from_output, lipschitz=1.0, code=3),
    "lipswish": _A(
        "lipswish", lipswish, lipswish_derivative, _lipswish_second, None, lipschitz=1.0, code=4
    ),
    "relu": _A("relu", relu, relu_derivative, None, _relu_from_output, lipschitz=1.0, code=0),
    "softplus": _A(
        "softplus",
        softplus,
        softplus_derivative,
        _softplus_second,
        _softplus_from_output,
        lipschitz=1.0,
        code=2,
    ),
    "tanh": _A(
        "tanh", tanh, tanh_derivative, _tanh_second, _tanh_from_output, lipschitz=1.0, code=1
    ),
}
del _A


def get(name, argname: str = "activation") -> Activation:
    """The table entry ``name``; a ``ValueError`` naming ``argname`` and listing every valid
    name otherwise."""
    return ACTIVATIONS[check_activation(name, argname)]


def check_activation(name, argname: str = "activation", supported=None) -> str:
    """Validate an ``activation=`` argument: ``name`` must be in :data:`ACTIVATIONS` and, when
    ``supported`` (a sequence of names) is given, among those (the subset a layer's fused code
    implements). The message lists the valid names."""
    valid = tuple(ACTIVATIONS) if supported is None else tuple(supported)
    for s in valid:
        if s not in ACTIVATIONS:  # a caller's subset must come from the table
            raise AssertionError(f"{s!r} is not in flowmath.activations.ACTIVATIONS")
    if isinstance(name, str) and name in valid:
        return name
    extra = ""
    if isinstance(name, str) and name in ACTIVATIONS:
        extra = " (it is in flowmath.activations, but this layer's code does not implement it)"
    raise ValueError(
        f"`{argname}` must be one of {', '.join(map(repr, valid))}; got {name!r}{extra}"
    )
