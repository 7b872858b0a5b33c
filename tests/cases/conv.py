from registry import Case

import flowmath as fm

CASES = [
    Case("InvConv1x1-lu", fm.InvConv1x1, (2, 4, 4)),
    Case("InvConv1x1-lu-c3", fm.InvConv1x1, (3, 4, 5)),
    Case("InvConv1x1-full", lambda: fm.InvConv1x1(lu=False), (3, 4, 5)),
    Case("PeriodicConv2d", fm.PeriodicConv2d, (2, 4, 4)),
    Case("PeriodicConv2d-c3-odd", fm.PeriodicConv2d, (3, 4, 5)),
    Case("PeriodicConv2d-k1", lambda: fm.PeriodicConv2d(kernel_size=1), (2, 3, 3)),
    Case("EmergingConv2d", fm.EmergingConv2d, (2, 4, 4)),
    Case("EmergingConv2d-c3", fm.EmergingConv2d, (3, 4, 5)),
    Case("EmergingConv2d-k5", lambda: fm.EmergingConv2d(kernel_size=5), (2, 3, 4)),
]
