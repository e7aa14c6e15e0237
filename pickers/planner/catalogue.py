"""Accelerator kinds a planner may buy, with a price per GPU-hour and a start-up time.

Default prices are approximate public on-demand list prices per GPU-hour of GPU clouds in 2025 (Lambda,
RunPod, CoreWeave and AWS price pages: H100 SXM about $2-3, H200 about $3.5, A100 80 GB about $1.3-1.8, L40S
about $0.8-1.0, MI300X about $2-2.5). They change often and differ by contract: pass your own with
``--accelerators H100=2.49,L40S=0.86``. A kind must be one the cost model knows.
"""

from __future__ import annotations

from dataclasses import dataclass

from engine.costmodel import ACCELERATORS

PRICE_SOURCE = ("approximate 2025 on-demand list prices per GPU-hour (Lambda, RunPod, CoreWeave, AWS); "
                "override with --accelerators KIND=PRICE")
DEFAULT_PRICES: dict[str, float] = {"H100": 2.49, "H200": 3.49, "A100": 1.49, "L40S": 0.86, "MI300X": 2.19}


@dataclass(frozen=True, slots=True)
class Catalogue:
    """Kinds on offer: price per GPU-hour (USD) and how long a new pod of that kind takes to serve."""

    prices: dict[str, float]
    startup_s: dict[str, float]

    def __post_init__(self) -> None:
        """A catalogue built in code is held to what ``parse_accelerators`` checks: known kinds (upper case),
        positive finite prices, a start-up time per kind."""
        if not self.prices:
            raise ValueError("the catalogue needs at least one kind")
        for kind, price in self.prices.items():
            if kind not in ACCELERATORS:
                raise ValueError(f"catalogue: unknown kind {kind!r}; known: {', '.join(sorted(ACCELERATORS))}")
            if not (isinstance(price, int | float) and 0 < price < float("inf")):
                raise ValueError(f"catalogue: price of {kind} must be positive and finite, got {price!r}")
            if not self.startup_s.get(kind, -1.0) >= 0:
                raise ValueError(f"catalogue: start-up time of {kind} must be >= 0 s")

    @property
    def kinds(self) -> list[str]:
        return list(self.prices)

    def price(self, kind: str) -> float:
        return self.prices[kind.upper()]


def parse_accelerators(text: str | None, startup_s: float = 60.0) -> Catalogue:
    """``"H100=2.49,L40S=0.86"`` (a kind alone takes its default price) -> Catalogue; clear errors on bad
    input: unknown kind, a price that is not a positive number, a kind named twice, an empty list."""
    if startup_s < 0:
        raise ValueError(f"start-up time must be >= 0 s, got {startup_s}")
    if text is None or not text.strip():
        raise ValueError("--accelerators is empty: name at least one kind, e.g. H100=2.49")
    prices: dict[str, float] = {}
    for item in text.split(","):
        item = item.strip()
        if not item:
            raise ValueError(f"--accelerators {text!r}: empty entry")
        kind, sep, price_text = item.partition("=")
        kind = kind.strip().upper()
        if kind not in ACCELERATORS:
            raise ValueError(f"--accelerators: unknown kind {kind!r}; known: {', '.join(sorted(ACCELERATORS))}")
        if kind in prices:
            raise ValueError(f"--accelerators: {kind} is named twice")
        if sep:
            try:
                price = float(price_text)
            except ValueError:
                raise ValueError(f"--accelerators: price of {kind} must be a number (USD per GPU-hour), "
                                 f"got {price_text!r}") from None
            if not price > 0 or price != price or price == float("inf"):
                raise ValueError(f"--accelerators: price of {kind} must be positive, got {price_text!r}")
        else:
            if kind not in DEFAULT_PRICES:
                raise ValueError(f"--accelerators: no default price for {kind}; give one: {kind}=PRICE")
            price = DEFAULT_PRICES[kind]
        prices[kind] = price
    return Catalogue(prices, {k: float(startup_s) for k in prices})


__all__ = ["DEFAULT_PRICES", "PRICE_SOURCE", "Catalogue", "parse_accelerators"]
