"""What the config files share: their preset names."""

SIZES = ("tiny", "paper", "micro")  # the CPU default, SPEC's scale, a smoke test


def check_size(arg: str, sizes=SIZES) -> str:
    """``arg`` if it names a preset, else a one-line ValueError listing them."""
    if arg not in sizes:
        raise ValueError(f"unknown preset {arg!r}; use one of {sizes}")
    return arg
