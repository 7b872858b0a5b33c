from registry import Case, unit_interval_data

import flowmath as fm

CASES = [
    Case("ELU", fm.ELU, (4,), grads=False),
    Case("ELU-alpha", lambda: fm.ELU(alpha=0.5), (2, 3, 3), grads=False),
    Case("LeakyReLU", fm.LeakyReLU, (4,), grads=False),
    Case("LeakyReLU-image", lambda: fm.LeakyReLU(0.2), (2, 3, 3), grads=False),
    Case("Logit", fm.Logit, (4,), data=unit_interval_data, grads=False),
    Case(
        "Logit-alpha", lambda: fm.Logit(alpha=0.05), (2, 3, 3), data=unit_interval_data, grads=False
    ),
    Case("Sigmoid", fm.Sigmoid, (4,), grads=False),
]
