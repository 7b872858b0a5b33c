from registry import Case

import flowmath as fm

CASES = [
    Case("FullLinear", fm.FullLinear, (5,)),
    Case("DiagonalLinear", fm.DiagonalLinear, (5,)),
    Case("TriangularLinear-lower", fm.TriangularLinear, (5,)),
    Case("TriangularLinear-upper", lambda: fm.TriangularLinear(lower=False), (5,)),
    Case("BlockDiagonalLinear", lambda: fm.BlockDiagonalLinear(2), (6,)),
    Case("LULinear", fm.LULinear, (5,)),
]
