"""Host-side integer helpers for the Triton launchers.

Since Triton 3.5 ``triton.cdiv`` and ``triton.next_power_of_2`` are constexpr functions: each call from host Python
goes through their wrapper and cost about 8 µs on the H100 host we profiled, four calls per kernel launch in our
launchers. A DeiT-T training step is bound by such host time, so the launchers use these plain versions.
"""

from __future__ import annotations


def cdiv(a: int, b: int) -> int:
    """⌈a / b⌉ for positive ``b``."""
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """The smallest power of two ≥ ``n`` (1 for ``n ≤ 1``)."""
    return 1 if n <= 1 else 1 << (n - 1).bit_length()
