"""Which metric names a PromQL expression reads, and the function each is read under.

Enough of PromQL's lexer to tell a metric name from everything else that looks like
an identifier: function and aggregation names (followed by `(`, or `by`/`without`),
label names (inside `{...}`, or listed after `by`, `without`, `on`, `ignoring`,
`group_left`, `group_right`), keywords (`and`, `bool`, `offset`, ...), strings,
numbers, durations and range selectors (`[5m]`, `[$__rate_interval]`: Grafana's
variables are skipped with them). A metric name is an identifier followed by `{`,
`[`, or used bare, or a bare selector's `__name__="..."` matcher. `exposed` reads a
Prometheus text exposition into the sample names it serves and their families'
types, so a caller can check that `x_bucket` belongs to a histogram and `rate(...)`
reads a counter.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

__all__ = ["MetricUse", "exposed", "metric_uses"]

_TOKEN = re.compile(
    r"""
    (?P<space>\s+)
  | (?P<string>"(?:\\.|[^"\\])*"|'(?:\\.|[^'\\])*'|`[^`]*`)
  | (?P<matchers>\{(?:"(?:\\.|[^"\\])*"|'(?:\\.|[^'\\])*'|`[^`]*`|[^}"'`])*\})
  | (?P<range>\[[^\]]*\])
  | (?P<duration>\d+(?:ms|[smhdwy])(?:\d+(?:ms|[smhdwy]))*(?![\w:]))
  | (?P<number>0[xX][0-9a-fA-F]+|(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?)
  | (?P<ident>[A-Za-z_:][A-Za-z0-9_:]*)
  | (?P<variable>\$\{?\w+\}?)
  | (?P<other>.)
    """,
    re.VERBOSE | re.DOTALL,
)
AGGREGATIONS = frozenset(
    ("sum", "min", "max", "avg", "group", "stddev", "stdvar", "count", "count_values",
     "bottomk", "topk", "quantile", "limitk", "limit_ratio")
)  # fmt: skip
# Followed by a parenthesised list of label names.
LABEL_LISTS = frozenset(("by", "without", "on", "ignoring", "group_left", "group_right"))
_NAME_MATCHER = re.compile(r'__name__\s*=\s*"([A-Za-z_:][A-Za-z0-9_:]*)"')
KEYWORDS = frozenset(("and", "or", "unless", "bool", "offset", "atan2", "inf", "nan"))


@dataclass(frozen=True)
class MetricUse:
    """A metric name in an expression, and the function calls around it, innermost first
    (`rate(x[1m])` in `sum(...)`: ("rate", "sum"))."""

    name: str
    functions: tuple[str, ...]


def _tokens(expr: str) -> list[tuple[str, str]]:
    """(kind, text) for every token but whitespace."""
    out = []
    for m in _TOKEN.finditer(expr):
        kind = m.lastgroup
        assert kind is not None
        if kind != "space":
            out.append((kind, m.group()))
    return out


def metric_uses(expr: str) -> list[MetricUse]:
    """Every metric name `expr` reads, in order, with its enclosing function calls."""
    tokens = _tokens(expr)
    uses: list[MetricUse] = []
    # One entry per open parenthesis: the function it calls, or "" for grouping.
    stack: list[str] = []
    skip_list = False  # the next "(...)" is a label list
    i = 0
    while i < len(tokens):
        kind, text = tokens[i]
        after = tokens[i + 1] if i + 1 < len(tokens) else ("", "")
        if kind == "ident":
            word = text.lower()
            if word in LABEL_LISTS:
                skip_list = after[1] == "("
            elif after[1] == "(":
                stack.append(text)
                i += 2  # the name and its "("
                continue
            elif word in AGGREGATIONS and after[1].lower() in ("by", "without"):
                # `sum by (le) (x)`: the aggregation's "(" comes after the label list.
                j = i + 2
                while j < len(tokens) and tokens[j][1] != ")":
                    j += 1
                if j + 1 < len(tokens) and tokens[j + 1][1] == "(":
                    stack.append(text)
                    i = j + 2
                    continue
            elif word not in KEYWORDS:
                uses.append(MetricUse(text, tuple(f for f in reversed(stack) if f)))
        elif kind == "matchers" and (i == 0 or tokens[i - 1][0] != "ident"):
            # A bare selector names its metric as a label: `{__name__="x", job="y"}`.
            if named := _NAME_MATCHER.search(text):
                uses.append(MetricUse(named.group(1), tuple(f for f in reversed(stack) if f)))
        elif text == "(":
            if skip_list:
                while i < len(tokens) and tokens[i][1] != ")":
                    i += 1
                skip_list = False
            else:
                stack.append("")
        elif text == ")" and stack:
            stack.pop()
        i += 1
    return uses


def exposed(text: str) -> dict[str, str]:
    """The sample names a Prometheus text exposition serves, as Prometheus stores them
    (`x_bucket`, `x_total`, a DCGM counter's bare name), each with its family's type.

    Read here rather than with prometheus_client's parser, which renames every counter
    sample to end in `_total`: a dcgm-exporter counter has no such suffix.
    """
    types: dict[str, str] = {}
    names: list[str] = []
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(maxsplit=3)
            types[name] = kind.strip()
        elif not line.startswith("#") and (name_match := _SAMPLE_NAME.match(line)):
            names.append(name_match.group())
    return {name: _family_type(name, types) for name in names}


_SAMPLE_NAME = re.compile(r"[A-Za-z_:][A-Za-z0-9_:]*")
# The suffixes each type's samples take after the family's name.
_SUFFIXES = {
    "histogram": ("_bucket", "_sum", "_count", "_created"),
    "summary": ("_sum", "_count", "_created"),
    "counter": ("_total", "_created"),
}


def _family_type(sample: str, types: dict[str, str]) -> str:
    """The type of the family a sample belongs to: its own name's, or that of its name
    less a suffix the family's type writes; "untyped" when no `# TYPE` covers it."""
    if sample in types:
        return types[sample]
    for kind, suffixes in _SUFFIXES.items():
        for suffix in suffixes:
            base = sample.removesuffix(suffix)
            if base != sample and types.get(base) == kind:
                return kind
    return "untyped"
