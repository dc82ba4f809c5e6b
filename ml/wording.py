"""Words for messages and reports: counted nouns ("1 vendor", "3 classes") and percentages ("4.9%",
"4.9% (3.2-6.8%)", "4.9% (3.2-6.8%, model only)", "4.9% [3.2, 6.8]")."""

import math


def count(n: int, noun: str) -> str:
    """``n`` (with thousands separators) and ``noun``, plural unless ``n`` is 1; nouns ending in s, x, ch
    or sh take -es ("3 classes"), a consonant and y -ies ("2 deliveries")."""
    if n == 1:
        return f"{n:,} {noun}"
    if noun.endswith("y") and noun[-2:-1] not in ("a", "e", "i", "o", "u", ""):
        return f"{n:,} {noun[:-1]}ies"
    plural = noun + ("es" if noun.endswith(("s", "x", "ch", "sh")) else "s")
    return f"{n:,} {plural}"


def is_finite_number(value) -> bool:
    """Whether ``value`` reads as a finite number (not None, NaN, pandas' NA or text)."""
    try:
        return math.isfinite(float(value))
    except (TypeError, ValueError):
        return False


def percent(value) -> str:
    """A fraction as a percentage with one decimal ("4.9%"); "n/a" when missing."""
    return f"{100 * float(value):.1f}%" if is_finite_number(value) else "n/a"


def percent_interval(rate, low, high, basis: str = "") -> str:
    """"4.9% (3.2-6.8%)": a rate and its 95% interval, fractions in; with ``basis`` (what the figure
    rests on) inside the brackets: "4.9% (3.2-6.8%, model only)"."""
    if not is_finite_number(rate):
        return "n/a"
    inside = [f"{100 * float(low):.1f}-{100 * float(high):.1f}%"] \
        if is_finite_number(low) and is_finite_number(high) else []
    inside += [basis] if basis else []
    return percent(rate) + (f" ({', '.join(inside)})" if inside else "")


def percent_bracket(rate, low, high) -> str:
    """"4.9% [3.2, 6.8]": a rate and its 95% interval, fractions in, for use inside round brackets."""
    return f"{percent(rate)} [{100 * float(low):.1f}, {100 * float(high):.1f}]"
