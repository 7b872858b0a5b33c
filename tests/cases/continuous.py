"""CNF with the exact trace, checked at solver tolerance.

The solves run at ``rtol = 1e-10, atol = 1e-12`` (Dormand-Prince 5(4), local error per step
below ``atol + rtol |y|`` in the RMS norm). Every quantity ``check_bijection`` compares is then a
different discretisation of the same ODE, so the differences are global errors of the solver,
not rounding: the round trip integrates forward then backward (two global errors), the
autograd Jacobian is the derivative of the discrete forward solve (its slogdet differs from the
integrated trace by the global error of the variational equation), the inverse's log-det comes
from a separate backward solve, and even batch independence holds only to the tolerance
(one adaptive step sequence serves the whole batch). With O(1) states and a Lipschitz constant
of O(1) over ``t1 = 0.5`` the global error is O(rtol): measured over 12 draws (seeds 0-5,
n = 1 and 3) the largest relative error of any field is 1.9e-11 (``CNF-exact``) and 1.2e-11
(``CNF-exact-squash``). ``tol64 = 10 * rtol = 1e-9`` leaves a 50x margin and still fails for any
wrong sign, missing factor ``t1`` or mis-packed log-det column (errors of order 1e-1). float32
inputs are integrated in float64 and cast back, so ``tol32`` is the float32 rounding.
"""

from registry import Case

import flowmath as fm

CASES = [
    Case(
        "CNF-exact", lambda: fm.CNF(hidden=(8,), t1=0.5, rtol=1e-10, atol=1e-12), (3,), tol64=1e-9
    ),
    Case(
        "CNF-exact-squash",
        lambda: fm.CNF(
            hidden=(5, 4),
            t1=0.5,
            time="concat-squash",
            activation="softplus",
            rtol=1e-10,
            atol=1e-12,
        ),
        (2,),
        tol64=1e-9,
    ),
]
