"""The lecture's information-theory figures, recomputed with ``pyrovae.lecture.theory`` and checked as they are drawn.

Writes ``coin_entropy.png``, ``surprise.png``, ``gaussian_kl.png``, ``claims.json`` (each claim with
the numbers measured, and provenance) and ``README.md`` (each claim beside its figure) to ``--out``.
Exits with status 1 if any claim fails.

    python experiments/studies/information_theory.py                       # results/theory/
    python experiments/studies/information_theory.py --smoke --out /tmp/x  # coarse grids, for the tests
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch

from pyrovae.lecture import figures, theory
from pyrovae.experiment import add_output_flags, command, output_folders
from pyrovae.atomic import write_json
from pyrovae.provenance import provenance

DTYPE = torch.float64
OUT = "results/theory"


def coin_entropy_claims(points: int, out: Path) -> list[dict]:
    """H(p) of a coin: largest at p = 1/2, where it is exactly 1 bit; 0 for a sure coin."""
    p = torch.linspace(0, 1, points, dtype=DTYPE)  # odd count: 0.5 is on the grid
    h = theory.entropy(torch.stack([p, 1 - p], dim=-1))
    figures.coin_entropy(p, h, out / "coin_entropy.png")
    best = int(h.argmax())
    return [
        claim("coin_entropy.png", "the entropy of a coin is largest for a fair coin, p = 1/2",
              p[best].item() == 0.5, argmax_p=p[best].item()),
        claim("coin_entropy.png", "a fair coin carries exactly 1 bit", h[best].item() == 1.0, entropy_bits=h[best].item()),
        claim("coin_entropy.png", "a sure coin (p = 0 or 1) carries 0 bits (0 log 0 = 0)",
              h[0].item() == 0.0 and h[-1].item() == 0.0, entropy_at_0=h[0].item(), entropy_at_1=h[-1].item()),
        claim("coin_entropy.png", "H(p) = H(1 - p)", bool(torch.allclose(h, h.flip(0), atol=1e-15))),
    ]


def surprise_claims(points: int, out: Path) -> list[dict]:
    """Surprise -log2 p, and the message-length example P(a) = P(b) = 1/4, P(c) = 1/2."""
    p = torch.linspace(1 / points, 1, points, dtype=DTYPE)
    s = theory.surprise(p)
    message = torch.tensor([0.25, 0.25, 0.5], dtype=DTYPE)  # a, b, c
    lengths = theory.surprise(message)  # code lengths of 10, 11, 0
    entropy = theory.entropy(message)
    marked = {f"p = {q:g}: {theory.surprise(q).item():g} bit": (q, theory.surprise(q).item()) for q in (0.125, 0.25, 0.5, 1.0)}
    figures.surprise_curve(p, s, marked, out / "surprise.png")
    return [
        claim("surprise.png", "an event of probability 1/2 carries 1 bit of surprise", theory.surprise(0.5).item() == 1.0,
              surprise_bits=theory.surprise(0.5).item()),
        claim("surprise.png", "halving the probability adds one bit", theory.surprise(0.25).item() == 2.0,
              surprise_of_quarter_bits=theory.surprise(0.25).item()),
        claim("surprise.png", "a sure event carries no surprise", theory.surprise(1.0).item() == 0.0),
        claim("surprise.png", "surprise falls as probability rises", bool((s.diff() < 0).all())),
        claim("surprise.png", "P(a) = P(b) = 1/4, P(c) = 1/2: code lengths 2, 2, 1 bits (codes 10, 11, 0)",
              lengths.tolist() == [2.0, 2.0, 1.0], code_lengths_bits=lengths.tolist()),
        claim("surprise.png", "... and the entropy, the average code length, is 1.5 bits",
              entropy.item() == 1.5 and (message * lengths).sum().item() == 1.5, entropy_bits=entropy.item()),
    ]


def gaussian_kl_claims(points: int, out: Path) -> list[dict]:
    """KL between p = N(0, 1) and q as q's mean moves (q = N(m, 2^2)) and as its scale changes."""
    def kl(mu0, var0, mu1, var1):  # 1-D Gaussians through the full-covariance formula
        return theory.kl_gaussian(mu0.unsqueeze(-1), var0.reshape(-1, 1, 1), mu1.unsqueeze(-1), var1.reshape(-1, 1, 1))

    zero, one = torch.zeros(points, dtype=DTYPE), torch.ones(points, dtype=DTYPE)
    shifts = torch.linspace(-4, 4, points, dtype=DTYPE)
    wide = torch.full((points,), 4.0, dtype=DTYPE)
    kl_shift = {"KL(p || q)": kl(zero, one, shifts, wide), "KL(q || p)": kl(shifts, wide, zero, one)}
    scales = torch.logspace(-1, 1, points, dtype=DTYPE)  # 0.1 .. 10, with 1 on the grid for odd counts
    kl_scale = {"KL(p || q)": kl(zero, one, zero, scales**2), "KL(q || p)": kl(zero, scales**2, zero, one)}

    grid = torch.linspace(-6, 8, 400, dtype=DTYPE)
    densities = {"p = N(0, 1)": torch.distributions.Normal(0.0, 1.0).log_prob(grid).exp(),
                 "q = N(2, 2$^2$)": torch.distributions.Normal(2.0, 2.0).log_prob(grid).exp()}
    figures.gaussian_kl_asymmetry(grid, densities, shifts, kl_shift, scales, kl_scale, out / "gaussian_kl.png")

    at = lambda values, x, where: values[int((where - x).abs().argmin())].item()  # noqa: E731
    forward_2, backward_2 = at(kl_shift["KL(p || q)"], 2.0, shifts), at(kl_shift["KL(q || p)"], 2.0, shifts)
    every = torch.cat([*kl_shift.values(), *kl_scale.values()])
    equal = kl_scale["KL(p || q)"][int((scales - 1).abs().argmin())].item()
    # closed forms in one dimension, to check the plotted curves against
    expected_forward = 0.5 * (1 / 4 + 4 / 4 - 1 + math.log(4))
    expected_backward = 0.5 * (4 + 4 - 1 - math.log(4))
    return [
        claim("gaussian_kl.png", "KL is not symmetric: at m = 2, KL(p||q) != KL(q||p)",
              abs(forward_2 - backward_2) > 0.5, kl_p_q_at_2=forward_2, kl_q_p_at_2=backward_2),
        claim("gaussian_kl.png", "the curves match the 1-D closed form 0.5 (s0^2/s1^2 + (m1-m0)^2/s1^2 - 1 + log s1^2/s0^2)",
              math.isclose(forward_2, expected_forward, rel_tol=1e-12)
              and math.isclose(backward_2, expected_backward, rel_tol=1e-12)),
        claim("gaussian_kl.png", "KL >= 0 everywhere on both sweeps", bool((every >= -1e-15).all()), minimum=every.min().item()),
        claim("gaussian_kl.png", "KL = 0 when the two distributions are equal (s = 1)", abs(equal) < 1e-15, kl_at_equal=equal),
        claim("gaussian_kl.png", "a q too narrow is punished more by KL(p||q) than a q too wide (at s = 0.1 vs 10)",
              kl_scale["KL(p || q)"][0].item() > kl_scale["KL(p || q)"][-1].item(),
              kl_p_q_at_s_0_1=kl_scale["KL(p || q)"][0].item(), kl_p_q_at_s_10=kl_scale["KL(p || q)"][-1].item()),
    ]


def claim(figure: str, text: str, holds: bool, **numbers) -> dict:
    return {"figure": figure, "claim": text, "holds": bool(holds), **numbers}


def write_readme(path: Path, claims: list[dict], made_by: str) -> None:
    lines = [
        "# Information theory: the lecture's claims, recomputed",
        "",
        "Made by",
        "",
        f"    {made_by}",
        "",
        "from `pyrovae.lecture.theory` (every formula is in its docstring; tested in `tests/test_theory.py`).",
        "Numbers and provenance are in `claims.json`.",
        "",
        "| figure | claim | holds | measured |",
        "| --- | --- | --- | --- |",
    ]
    for c in claims:
        numbers = ", ".join(f"{k} = {v:.6g}" if isinstance(v, float) else f"{k} = {v}"
                            for k, v in c.items() if k not in ("figure", "claim", "holds"))
        text = c["claim"].replace("|", "\\|")  # a bare | would end the table cell
        lines.append(f"| `{c['figure']}` | {text} | {'yes' if c['holds'] else '**NO**'} | {numbers} |")
    lines += [
        "",
        "`looking_back.png`, `looking_back_first_image.png` and `looking_back.json`, if present, come from",
        "`experiments/studies/looking_back.py`;",
        "`looking_back.md` says what they show and how they were made.",
        "",
    ]
    path.write_text("\n".join(lines))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_output_flags(p, out=OUT, smoke="coarse grids, for the tests")
    args = p.parse_args(argv)
    points = 21 if args.smoke else 1001  # odd: p = 1/2, m = 0 and s = 1 lie on the grids

    with output_folders(args.smoke, args.out, default_out=OUT) as folders:
        out = folders.out
        out.mkdir(parents=True, exist_ok=True)
        claims = [*coin_entropy_claims(points, out), *surprise_claims(points, out), *gaussian_kl_claims(points, out)]
        write_json(out / "claims.json", {"claims": claims, "grid_points": points, **provenance()})
        write_readme(out / "README.md", claims, command(__file__, argv))

        for c in claims:
            print(f"{'ok  ' if c['holds'] else 'FAIL'} {c['figure']:17s} {c['claim']}")
        print(f"wrote {out}")
    return 0 if all(c["holds"] for c in claims) else 1


if __name__ == "__main__":
    sys.exit(main())
