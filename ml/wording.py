"""Counted nouns for messages and reports: "1 vendor", "2 vendors", "3 classes"."""


def count(n: int, noun: str) -> str:
    """``n`` (with thousands separators) and ``noun``, plural unless ``n`` is 1; nouns ending in s, x, ch
    or sh take -es ("3 classes")."""
    if n == 1:
        return f"{n:,} {noun}"
    plural = noun + ("es" if noun.endswith(("s", "x", "ch", "sh")) else "s")
    return f"{n:,} {plural}"
