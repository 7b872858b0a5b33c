from registry import Case

import flowmath as fm

CASES = [
    # exact log-det (dense Jacobian): deterministic, checked against slogdet at 1e-9
    Case("IResBlock-exact", lambda: fm.IResBlock(hidden=(8, 8), logdet="exact"), (4,)),
    Case(
        "IResBlock-exact-lipswish",
        lambda: fm.IResBlock(hidden=(6,), logdet="exact", activation="lipswish"),
        (3,),
    ),
    Case("IResBlock-exact-linear", lambda: fm.IResBlock(hidden=(), logdet="exact"), (3,)),
]
