"""Butcher tableaux of explicit Runge-Kutta methods as validated data.

A tableau ``(A, b, c)`` defines the explicit Runge-Kutta step

.. math::

    K_i = f\\Big(t + c_i h,\\; y + h \\sum_{j<i} a_{ij} K_j\\Big), \\qquad
    y_{n+1} = y_n + h \\sum_i b_i K_i .

:class:`ButcherTableau` checks in ``__post_init__`` that ``A`` is strictly lower triangular, that
the row sums of ``A`` equal ``c``, and that the weights satisfy every order condition
:math:`\\sum_i b_i \\Phi_i(\\tau) = 1/\\gamma(\\tau)` for all rooted trees :math:`\\tau` with
at most ``order`` nodes (and the embedded weights up to ``embedded_order``); a dense-output
matrix, when given, must reproduce ``b`` at :math:`\\theta = 1`.

References
----------
Hairer, Norsett, Wanner (1993), *Solving Ordinary Differential Equations I*, Sec. II.2 (order
conditions, rooted trees) and II.6 (dense output).
Dormand, Prince (1980), "A family of embedded Runge-Kutta formulae", J. Comput. Appl. Math. 6.
Shampine (1986), "Some practical Runge-Kutta formulas", Math. Comp. 46 (the 4th-order interpolant).
Bogacki, Shampine (1989), "A 3(2) pair of Runge-Kutta formulas", Appl. Math. Lett. 2(4).
Tsitouras (2011), "Runge-Kutta pairs of order 5(4) satisfying only the first column simplifying
assumption", Comput. Math. Appl. 62(2), 770-775.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from fractions import Fraction
from functools import cache

import numpy as np

__all__ = [
    "BOSH3",
    "ButcherTableau",
    "DOPRI5",
    "EULER",
    "RK4",
    "TABLEAUX",
    "TSIT5",
    "hermite_dense",
    "rooted_trees",
]

#: Tolerance of the exactness checks on tableau coefficients (they are rationals in float64).
_TABLEAU_TOL = 1e-13


@cache
def rooted_trees(order: int) -> tuple:
    """All rooted trees with exactly ``order`` nodes, each a sorted tuple of child subtrees.

    The single node is ``()``; a tree is the (sorted) tuple of the trees hanging from its root.
    Counts are 1, 1, 2, 4, 9, 20 for orders 1 ... 6 (OEIS A000081).
    """
    if order < 1:
        return ()
    if order == 1:
        return ((),)
    out = set()

    # Partitions of order - 1 nodes into a multiset of child trees (non-increasing by repr).
    def children(remaining, max_key):
        if remaining == 0:
            yield ()
            return
        for size in range(remaining, 0, -1):
            for child in rooted_trees(size):
                key = (size, child)
                if max_key is not None and key > max_key:
                    continue
                for rest in children(remaining - size, key):
                    yield (child,) + rest

    for kids in children(order - 1, None):
        out.add(tuple(sorted(kids)))
    return tuple(sorted(out))


def _tree_size(tree) -> int:
    return 1 + sum(_tree_size(c) for c in tree)


def _gamma(tree) -> int:
    """Tree factorial: gamma(tau) = |tau| * prod gamma(children)."""
    g = _tree_size(tree)
    for c in tree:
        g *= _gamma(c)
    return g


def _phi(tree, A: np.ndarray) -> np.ndarray:
    """Stage vector of the elementary weight: Phi_i(tau) = prod over children (A Phi(child))_i."""
    out = np.ones(A.shape[0])
    for c in tree:
        out = out * (A @ _phi(c, A))
    return out


def hermite_dense(b, fsal_last: int) -> np.ndarray:
    """Dense matrix of the cubic Hermite interpolant of an FSAL step, as stage weights.

    With :math:`y_{n+1} = y_n + h\\, b^\\top K`, :math:`f_n = K_1` and :math:`f_{n+1} = K_s`
    (First-Same-As-Last), the Hermite cubic through :math:`(y_n, f_n)` and
    :math:`(y_{n+1}, f_{n+1})` is

    .. math:: y(t_n + \\theta h) = y_n + h \\big((3\\theta^2 - 2\\theta^3)\\, b
        + (\\theta - 2\\theta^2 + \\theta^3)\\, e_1
        + (\\theta^3 - \\theta^2)\\, e_s\\big)^\\top K,

    a continuous extension of order 3 (local error :math:`O(h^4)`) when the method's order is at
    least 3.  Returned as ``dense`` of shape ``(s, 3)``: ``w(theta) = dense @ [theta, theta^2,
    theta^3]``.
    """
    b = np.asarray(b, dtype=np.float64)
    s = b.shape[0]
    dense = np.outer(b, [0.0, 3.0, -2.0])
    dense[0] += [1.0, -2.0, 1.0]
    dense[fsal_last] += [0.0, -1.0, 1.0]
    assert dense.shape == (s, 3)
    return dense


def _order_residuals(A, b, order):
    """Largest |b . Phi(tau) - 1/gamma(tau)| over the trees of each size 1..order."""
    res = []
    for p in range(1, order + 1):
        worst = 0.0
        for tree in rooted_trees(p):
            worst = max(worst, abs(float(b @ _phi(tree, A)) - 1.0 / _gamma(tree)))
        res.append(worst)
    return res


@dataclass(frozen=True)
class ButcherTableau:
    """An explicit Runge-Kutta method, validated on construction.

    Parameters
    ----------
    name : str
    c : array, shape (s,)
        Stage times (fractions of the step).
    A : array, shape (s, s)
        Strictly lower-triangular stage matrix; row sums must equal ``c``.
    b : array, shape (s,)
        Weights of the propagated solution, of classical order ``order``.
    order : int
        Order of the propagated solution; the order conditions of every rooted tree with at most
        ``order`` nodes are checked.
    b_embedded : array, shape (s,), optional
        Weights of the embedded (error-estimating) solution, of order ``embedded_order``.
    embedded_order : int, optional
    fsal : bool
        First Same As Last: the last stage is ``f(t + h, y_{n+1})`` and is reused as the next
        step's first stage (requires ``c[-1] == 1`` and ``A[-1] == b``).
    dense : array, shape (s, m), optional
        Continuous extension: ``y(t + theta h) = y + h sum_i w_i(theta) K_i`` with
        ``w(theta) = dense @ [theta, theta^2, ..., theta^m]``; must give ``w(1) = b``.
        When omitted for an FSAL tableau, the cubic Hermite interpolant of :func:`hermite_dense`
        is used (order ``min(3, order)``), so every FSAL tableau has dense output.
    dense_order : int, optional
        Order of the continuous extension (checked for theta in (0, 1]).

    Attributes
    ----------
    error_weights : ndarray, shape (s,)
        ``b - b_embedded``: the local error estimate is ``h * error_weights @ K``.

    References
    ----------
    Butcher (2016), *Numerical Methods for Ordinary Differential Equations*, 3rd ed., Ch. 3.
    Hairer, Norsett, Wanner (1993), *Solving Ordinary Differential Equations I*, Sec. II.2.

    Examples
    --------
    The explicit midpoint rule is of order 2, and claiming order 3 is refused:

    >>> from flowmath.ode import ButcherTableau
    >>> mid = ButcherTableau(name="midpoint", c=[0, 0.5], A=[[0, 0], [0.5, 0]], b=[0, 1], order=2)
    >>> mid.n_stages, mid.adaptive
    (2, False)
    >>> try:
    ...     ButcherTableau(name="x", c=[0, 0.5], A=[[0, 0], [0.5, 0]], b=[0, 1], order=3)
    ... except ValueError as err:
    ...     print(str(err).split(";")[1])
     residuals by tree size [0.0, 0.0, 0.16666666666666666]
    """

    name: str
    c: np.ndarray
    A: np.ndarray
    b: np.ndarray
    order: int
    b_embedded: np.ndarray | None = None
    embedded_order: int | None = None
    fsal: bool = False
    dense: np.ndarray | None = None
    dense_order: int | None = None
    error_weights: np.ndarray | None = field(init=False, default=None)

    def __post_init__(self):
        def arr(x):
            a = np.array(x, dtype=np.float64)
            a.setflags(write=False)
            return a

        for key in ("c", "A", "b", "b_embedded", "dense"):
            val = getattr(self, key)
            if val is not None:
                object.__setattr__(self, key, arr(val))
        A, b, c = self.A, self.b, self.c
        s = b.shape[0]
        if A.shape != (s, s) or c.shape != (s,):
            raise ValueError(
                f"tableau {self.name!r}: `A` must be ({s}, {s}) and `c` ({s},); "
                f"got {A.shape} and {c.shape}"
            )
        if np.any(np.triu(A) != 0):
            raise ValueError(
                f"tableau {self.name!r}: `A` must be strictly lower triangular (explicit)"
            )
        if np.max(np.abs(A.sum(axis=1) - c)) > _TABLEAU_TOL:
            raise ValueError(
                f"tableau {self.name!r}: row sums of `A` must equal `c`; got {A.sum(axis=1)} vs {c}"
            )
        res = _order_residuals(A, b, self.order)
        if max(res) > _TABLEAU_TOL:
            raise ValueError(
                f"tableau {self.name!r}: weights `b` fail the order conditions of order "
                f"{self.order}; residuals by tree size {res}"
            )
        if self.b_embedded is not None:
            if self.embedded_order is None:
                raise ValueError(
                    f"tableau {self.name!r}: `embedded_order` is required with `b_embedded`"
                )
            res = _order_residuals(A, self.b_embedded, self.embedded_order)
            if max(res) > _TABLEAU_TOL:
                raise ValueError(
                    f"tableau {self.name!r}: `b_embedded` fails the order conditions of order "
                    f"{self.embedded_order}; residuals by tree size {res}"
                )
            object.__setattr__(self, "error_weights", arr(b - self.b_embedded))
        if self.fsal and (
            abs(c[-1] - 1.0) > _TABLEAU_TOL or np.max(np.abs(A[-1] - b)) > _TABLEAU_TOL
        ):
            raise ValueError(f"tableau {self.name!r}: FSAL needs c[-1] = 1 and A[-1] = b")
        if self.fsal and self.dense is None:
            object.__setattr__(self, "dense", arr(hermite_dense(b, s - 1)))
            object.__setattr__(self, "dense_order", min(3, self.order))
        if self.dense is not None:
            if self.dense.shape[0] != s:
                raise ValueError(f"tableau {self.name!r}: `dense` must have {s} rows")
            if np.max(np.abs(self.dense.sum(axis=1) - b)) > _TABLEAU_TOL:
                raise ValueError(
                    f"tableau {self.name!r}: dense output must reproduce `b` at theta = 1"
                )
            if self.dense_order is not None:
                # Order conditions of the continuous extension: for every tree tau with
                # |tau| <= p, sum_i w_i(theta) Phi_i(tau) = theta^|tau| / gamma(tau).
                for theta in (0.25, 0.5, 0.8):
                    w = self.dense_weights(theta)
                    for p in range(1, self.dense_order + 1):
                        for tree in rooted_trees(p):
                            lhs = float(w @ _phi(tree, A))
                            if abs(lhs - theta**p / _gamma(tree)) > _TABLEAU_TOL:
                                raise ValueError(
                                    f"tableau {self.name!r}: dense output fails order "
                                    f"{self.dense_order} at theta={theta}"
                                )

    @property
    def n_stages(self) -> int:
        return int(self.b.shape[0])

    @property
    def adaptive(self) -> bool:
        """Whether the tableau carries an embedded pair (error estimate, step control)."""
        return self.b_embedded is not None

    @property
    def continuous(self) -> bool:
        """Whether the tableau has a continuous extension (dense output inside a step)."""
        return self.dense is not None

    @property
    def error_exponent(self) -> float:
        """``-1 / (min(order, embedded_order) + 1)``: the elementary controller's exponent."""
        return -1.0 / (min(self.order, self.embedded_order) + 1)

    def dense_weights(self, theta: float) -> np.ndarray:
        """Stage weights ``w(theta)``, shape (s,): ``y(t + theta h) = y + h w(theta) @ K``.

        ``theta == 1`` returns ``b`` exactly, so an output at a step end is bitwise the step's
        result.
        """
        if theta == 1.0:
            return self.b
        if self.dense is None:
            raise ValueError(f"tableau {self.name!r} has no dense output")
        m = self.dense.shape[1]
        powers = theta ** np.arange(1, m + 1)
        return self.dense @ powers


# Euler's dense output is the straight line y_n + theta h K_1 (order 1).
EULER = ButcherTableau(
    name="euler", c=[0.0], A=[[0.0]], b=[1.0], order=1, dense=[[1.0]], dense_order=1
)

# Classical RK4 with its "free" continuous extension of order 3 (Hairer-Norsett-Wanner I,
# Sec. II.6, Eq. (6.9)): b_1(theta) = theta - 3 theta^2 / 2 + 2 theta^3 / 3,
# b_2 = b_3 = theta^2 - 2 theta^3 / 3, b_4 = -theta^2 / 2 + 2 theta^3 / 3.
RK4 = ButcherTableau(
    name="rk4",
    c=[0.0, 0.5, 0.5, 1.0],
    A=[[0, 0, 0, 0], [0.5, 0, 0, 0], [0, 0.5, 0, 0], [0, 0, 1.0, 0]],
    b=[1 / 6, 1 / 3, 1 / 3, 1 / 6],
    order=4,
    dense=[[1, -1.5, 2 / 3], [0, 1, -2 / 3], [0, 1, -2 / 3], [0, -0.5, 2 / 3]],
    dense_order=3,
)

# Bogacki-Shampine 3(2), FSAL (scipy's RK23); dense output: the cubic Hermite interpolant.
BOSH3 = ButcherTableau(
    name="bosh3",
    c=[0.0, 0.5, 0.75, 1.0],
    A=[[0, 0, 0, 0], [0.5, 0, 0, 0], [0, 0.75, 0, 0], [2 / 9, 1 / 3, 4 / 9, 0]],
    b=[2 / 9, 1 / 3, 4 / 9, 0],
    order=3,
    b_embedded=[7 / 24, 1 / 4, 1 / 3, 1 / 8],
    embedded_order=2,
    fsal=True,
)


def _f(n, d):
    return float(Fraction(n, d))


# Dormand-Prince 5(4), FSAL, with Shampine's 4th-order continuous extension (coefficients as in
# Hairer-Norsett-Wanner's DOPRI5 code and scipy's RK45).
DOPRI5 = ButcherTableau(
    name="dopri5",
    c=[0.0, 1 / 5, 3 / 10, 4 / 5, 8 / 9, 1.0, 1.0],
    A=[
        [0, 0, 0, 0, 0, 0, 0],
        [_f(1, 5), 0, 0, 0, 0, 0, 0],
        [_f(3, 40), _f(9, 40), 0, 0, 0, 0, 0],
        [_f(44, 45), _f(-56, 15), _f(32, 9), 0, 0, 0, 0],
        [_f(19372, 6561), _f(-25360, 2187), _f(64448, 6561), _f(-212, 729), 0, 0, 0],
        [_f(9017, 3168), _f(-355, 33), _f(46732, 5247), _f(49, 176), _f(-5103, 18656), 0, 0],
        [_f(35, 384), 0, _f(500, 1113), _f(125, 192), _f(-2187, 6784), _f(11, 84), 0],
    ],
    b=[_f(35, 384), 0, _f(500, 1113), _f(125, 192), _f(-2187, 6784), _f(11, 84), 0],
    order=5,
    b_embedded=[
        _f(5179, 57600),
        0,
        _f(7571, 16695),
        _f(393, 640),
        _f(-92097, 339200),
        _f(187, 2100),
        _f(1, 40),
    ],
    embedded_order=4,
    fsal=True,
    dense=[
        [1, _f(-8048581381, 2820520608), _f(8663915743, 2820520608), _f(-12715105075, 11282082432)],
        [0, 0, 0, 0],
        [
            0,
            _f(131558114200, 32700410799),
            _f(-68118460800, 10900136933),
            _f(87487479700, 32700410799),
        ],
        [0, _f(-1754552775, 470086768), _f(14199869525, 1410260304), _f(-10690763975, 1880347072)],
        [
            0,
            _f(127303824393, 49829197408),
            _f(-318862633887, 49829197408),
            _f(701980252875, 199316789632),
        ],
        [0, _f(-282668133, 205662961), _f(2019193451, 616988883), _f(-1453857185, 822651844)],
        [0, _f(40617522, 29380423), _f(-110615467, 29380423), _f(69997945, 29380423)],
    ],
    dense_order=4,
)


def _tsit5_dense():
    """Tsitouras's 4th-order continuous extension (Tsitouras 2011, Sec. 3), from its factored
    form: ``w_i(theta)`` as coefficients of ``theta, ..., theta^4`` (rows ``i = 1..7``)."""
    P = np.polynomial.polynomial
    th = [0.0, 1.0]  # theta
    th2 = [0.0, 0.0, 1.0]  # theta^2
    factored = [
        (-1.0530884977290216,
         [th, [-1.3299890189751412, 1.0], [0.7139816917074209, -1.4364028541716351, 1.0]]),
        (0.1017, [th2, [1.2949852507374631, -2.1966568338249754, 1.0]]),
        (2.490627285651252793, [th2, [1.57803468208092486, -2.38535645472061657, 1.0]]),
        (-16.54810288924490272, [th2, [-1.21712927295533244, 1.0], [-0.61620406037800089, 1.0]]),
        (47.37952196281928122, [th2, [-1.203071208372362603, 1.0], [-0.658047292653547382, 1.0]]),
        (-34.87065786149660974, [th2, [-1.2, 1.0], [-2.0 / 3.0, 1.0]]),
        (2.5, [th2, [-1.0, 1.0], [-0.6, 1.0]]),
    ]  # fmt: skip
    rows = []
    for scale, factors in factored:
        poly = np.array([scale])
        for fac in factors:
            poly = P.polymul(poly, fac)
        rows.append(np.pad(poly, (0, 5 - len(poly)))[1:5])
    return np.array(rows)


# Tsitouras 5(4), FSAL (Tsitouras 2011, Table 1: the coefficients as printed there, to 16
# digits; the order conditions hold to 2e-14, checked on construction), with the paper's
# 4th-order continuous extension.
TSIT5 = ButcherTableau(
    name="tsit5",
    c=[0.0, 0.161, 0.327, 0.9, 0.9800255409045097, 1.0, 1.0],
    A=[
        [0, 0, 0, 0, 0, 0, 0],
        [0.161, 0, 0, 0, 0, 0, 0],
        [-0.008480655492356989, 0.335480655492357, 0, 0, 0, 0, 0],
        [2.897153057105493, -6.359448489975075, 4.3622954328695815, 0, 0, 0, 0],
        [
            5.325864828439257,
            -11.748883564062828,
            7.4955393428898365,
            -0.09249506636175525,
            0,
            0,
            0,
        ],
        [
            5.86145544294642,
            -12.92096931784711,
            8.159367898576159,
            -0.071584973281401,
            -0.028269050394068383,
            0,
            0,
        ],
        [
            0.09646076681806523,
            0.01,
            0.4798896504144996,
            1.379008574103742,
            -3.290069515436081,
            2.324710524099774,
            0,
        ],
    ],
    b=[
        0.09646076681806523,
        0.01,
        0.4798896504144996,
        1.379008574103742,
        -3.290069515436081,
        2.324710524099774,
        0,
    ],
    order=5,
    b_embedded=[
        0.09468075576583945,
        0.009183565540343,
        0.4877705284247616,
        1.234297566930479,
        -2.707712349983526,
        1.866628418170587,
        1 / 66,
    ],
    embedded_order=4,
    fsal=True,
    dense=_tsit5_dense(),
    dense_order=4,
)

#: The methods `fm.odeint` accepts by name (any other :class:`ButcherTableau` may be passed).
TABLEAUX = {"euler": EULER, "rk4": RK4, "bosh3": BOSH3, "dopri5": DOPRI5, "tsit5": TSIT5}
