"""Formatting shared by the analyses: significance stars, LaTeX (booktabs) tables."""

from __future__ import annotations

import math

_TEX = {
    "\\": r"\textbackslash{}",
    "&": r"\&",
    "%": r"\%",
    "$": r"\$",
    "#": r"\#",
    "_": r"\_",
    "{": r"\{",
    "}": r"\}",
    "~": r"\textasciitilde{}",
    "^": r"\textasciicircum{}",
}


def stars(p: float | None) -> str:
    """*** p<0.001, ** p<0.01, * p<0.05, else ''."""
    if p is None or not math.isfinite(p):
        return ""
    return "***" if p < 0.001 else "**" if p < 0.01 else "*" if p < 0.05 else ""


STARS_LEGEND = "*** p<0.001, ** p<0.01, * p<0.05"


def tex(text) -> str:
    """`text` with LaTeX special characters escaped."""
    return "".join(_TEX.get(c, c) for c in str(text))


def fmt_p(p: float | None) -> str:
    """A p-value as text: 3 significant digits, '<1e-16' below double precision, 'n/a' when undefined."""
    if p is None or not math.isfinite(p):
        return "n/a"
    return "<1e-16" if p < 1e-16 else f"{p:.3g}"


def tex_p(p: float | None) -> str:
    """A p-value for a LaTeX cell: 0.034, or $8.11\\times10^{-13}$ below 0.001."""
    if p is None or not math.isfinite(p):
        return "--"
    if p < 1e-16:
        return r"$<10^{-16}$"
    if p >= 0.001:
        return f"{p:.3f}"
    mantissa, exponent = f"{p:.2e}".split("e")
    return rf"${mantissa}\times10^{{{int(exponent)}}}$"


def latex_table(header: list[str], rows: list[list[str]], align: str, caption: str, label: str) -> str:
    """A booktabs table; cells are LaTeX already (escape data with `tex`)."""
    body = [" & ".join(row) + r" \\" for row in rows]
    return "\n".join(
        [
            r"% needs \usepackage{booktabs}",
            r"\begin{table}[t]",
            r"\centering",
            rf"\caption{{{caption}}}",
            rf"\label{{{label}}}",
            rf"\begin{{tabular}}{{{align}}}",
            r"\toprule",
            " & ".join(header) + r" \\",
            r"\midrule",
            *body,
            r"\bottomrule",
            r"\end{tabular}",
            r"\end{table}",
            "",
        ]
    )
