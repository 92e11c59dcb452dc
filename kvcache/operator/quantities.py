"""Byte quantities in the form the API server stores them: pure.

The API server rewrites every quantity it stores into a canonical form (`1024Mi` becomes `1Gi`,
`1.5Gi` becomes `1536Mi`, `1000M` becomes `1G`). A child rendered with another spelling never
looks applied: the operator would patch it on every pass, and a StatefulSet's claim template,
which cannot be patched, would be replaced on every pass. So the operator renders quantities
canonically, following apimachinery's `Quantity.CanonicalizeBytes`.
"""

from __future__ import annotations

import math
import re
from fractions import Fraction

_QUANTITY = re.compile(r"^([0-9]+(?:\.[0-9]+)?)(k|M|G|T|P|E|Ki|Mi|Gi|Ti|Pi|Ei)?$")
_BINARY = ("", "Ki", "Mi", "Gi", "Ti", "Pi", "Ei")
_DECIMAL = ("", "k", "M", "G", "T", "P", "E")


def canonical(quantity: str) -> str:
    """`quantity` (a plain or suffixed non-negative number, as spec.disk allows) as the API
    server writes it back: a binary suffix keeps a binary form when the value is a whole number
    of bytes from 1Ki up, anything else takes the largest decimal suffix with a whole number."""
    match = _QUANTITY.match(quantity)
    if match is None:
        raise ValueError(f"not a byte quantity: {quantity!r}")
    number, suffix = match.group(1), match.group(2) or ""
    if suffix.endswith("i"):
        value = Fraction(number) * 1024 ** _BINARY.index(suffix)
        if value >= 1024 and value.denominator == 1:
            count, power = int(value), 0
            while count % 1024 == 0 and power < len(_BINARY) - 1:
                count, power = count // 1024, power + 1
            return f"{count}{_BINARY[power]}"
    else:
        value = Fraction(number) * 1000 ** _DECIMAL.index(suffix)
    if value == 0:
        return "0"
    for power in range(len(_DECIMAL) - 1, -1, -1):
        scaled = value / 1000**power
        if scaled.denominator == 1:
            return f"{scaled}{_DECIMAL[power]}"
    return f"{math.ceil(value * 1000)}m"  # below a byte: milli-units, rounded up as Kubernetes
