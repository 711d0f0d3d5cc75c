"""The words an analyst reads in the MLflow UI: a run's description and a model version's.

A run's description (the `mlflow.note.content` tag, Markdown) says in a few lines what the
metrics table says in numbers: the headline metric against the run's own baselines and the
current champion, whether the run was registered and promoted, what data it saw, and which
plots to open first. A model version's description says why the version is (or is not) the
champion and what it beat. Both are built here from plain values, so this module imports no
MLflow and the wording is tested without a store.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

CHAMPION = "champion"


@dataclass
class Champion:
    """The model version that holds alias `champion` when a run is compared with it."""

    name: str
    version: str
    value: float | None  # its run's value of the compared metric (None: the run lacks it)
    run_id: str | None = None


@dataclass
class Decision:
    """The outcome of registering a run's model: the new version and whether it took the alias."""

    name: str
    version: str
    metric: str
    value: float
    champion: Champion | None  # the champion before this registration
    better: bool  # beats the champion (True when there was none to beat)
    forced: bool  # --force
    lower_is_better: bool = True

    @property
    def promoted(self) -> bool:
        return self.better or self.forced

    def result(self) -> dict[str, Any]:
        """The `registered` entry of `train --json` (the CLI contract)."""
        return {"name": self.name, "version": self.version, "alias": CHAMPION if self.promoted else None,
                "champion_metric": self.champion.value if self.champion else None, "metric": self.metric}

    def tags(self) -> dict[str, str]:
        """Model version tags: filterable in the registry UI and `search_model_versions`."""
        tags = {"tabrec.promoted": str(self.promoted).lower(), "tabrec.forced": str(self.forced).lower(),
                "tabrec.metric": self.metric, f"tabrec.{self.metric}": f"{self.value:.6g}"}
        if self.champion is not None:
            tags["tabrec.previous_champion"] = self.champion.version
        return tags

    def sentence(self) -> str:
        """One line: promoted or not, and why."""
        champ = self.champion
        m = f"`{self.metric}` {fmt(self.value)}"
        if champ is None:
            why = "the first version to take the alias (no champion to beat)"
        elif champ.value is None:
            why = f"champion version {champ.version}'s run has no `{self.metric}` to compare with"
        else:
            why = (f"{m} {'beats' if self.better else 'does not beat'} champion version {champ.version} "
                   f"({fmt(champ.value)}): {change(self.value, champ.value, self.lower_is_better)}")
        if self.forced and not self.better:
            return f"**Promoted to `{CHAMPION}` with `--force`**: {why}."
        if self.forced:
            return f"**Promoted to `{CHAMPION}`** (`--force` given, not needed): {why}."
        if self.promoted:
            return f"**Promoted to `{CHAMPION}`**: {why}."
        return f"**Not promoted**: {why}; alias `{CHAMPION}` stays on version {champ.version if champ else '?'}."


@dataclass
class Headline:
    """A run's headline metric and what it is compared with."""

    metric: str
    value: float
    baselines: list[tuple[str, str, float]] = field(default_factory=list)  # (label, metric, value)
    lower_is_better: bool = True
    champion: Champion | None = None  # the champion of the model name the run registers under
    register: str | None = None  # --register NAME


def fmt(x: float | None) -> str:
    if x is None:
        return "n/a"
    return f"{x:.4f}" if abs(x) >= 1e-3 else f"{x:.3g}"


def change(value: float, reference: float, lower_is_better: bool = True) -> str:
    """'3.2 % better (−0.0041)' style comparison of `value` with `reference`."""
    diff = value - reference
    if reference == 0 or diff == 0:
        return "equal" if diff == 0 else f"{'+' if diff > 0 else '−'}{fmt(abs(diff))}"
    pct = abs(diff) / abs(reference) * 100
    good = diff < 0 if lower_is_better else diff > 0
    return f"{pct:.1f} % {'better' if good else 'worse'} ({'+' if diff > 0 else '−'}{fmt(abs(diff))})"


def headline_lines(h: Headline) -> list[str]:
    lines = [f"**`{h.metric}` = {fmt(h.value)}** ({'lower' if h.lower_is_better else 'higher'} is better)"]
    for label, key, value in h.baselines:
        lines.append(f"- vs {label} (`{key}` {fmt(value)}): {change(h.value, value, h.lower_is_better)}")
    if h.champion is not None and h.champion.value is not None:
        c = h.champion
        lines.append(f"- vs current champion {c.name} version {c.version} ({fmt(c.value)}): "
                     f"{change(h.value, c.value, h.lower_is_better)}")
    elif h.champion is not None:
        lines.append(f"- current champion {h.champion.name} version {h.champion.version} has no `{h.metric}`")
    elif h.register:
        lines.append(f"- no champion of {h.register} yet: this run's model will be the first")
    return lines


def decision_line(h: Headline, decision: Decision | None, pending: bool) -> str:
    if decision is not None:
        return f"Registered as **{decision.name} version {decision.version}**. {decision.sentence()}"
    if h.register and pending:
        return f"Registration as {h.register} follows when the run has ended."
    return "Not registered (no `--register`): no promotion decision."


def data_lines(inputs: Sequence[Mapping[str, Any]]) -> list[str]:
    """One line per logged dataset: context, rows, the profile's ranges and counts, the sources."""
    out = []
    for d in inputs:
        prof = d.get("profile", {})
        parts = [f"{int(prof.get('num_rows', 0)):,} rows"]
        if prof.get("date_min"):
            parts.append(f"{prof['date_min']} to {prof['date_max']}")
        parts += [f"{int(v):,} {k.removeprefix('n_')}" for k, v in prof.items()
                  if k.startswith("n_") and k != "n_files" and isinstance(v, int | float)]
        if prof.get("selection"):
            parts.append(str(prof["selection"]))
        files = ", ".join(f"`{s['name']}`" for s in d.get("sources", []))
        note = f" ({prof['note']})" if prof.get("note") else ""
        out.append(f"- {d['context']}: {', '.join(parts)}; from {files}{note}")
    return out


def run_description(h: Headline, inputs: Sequence[Mapping[str, Any]], highlights: Sequence[str],
                    findings: Sequence[str] = (), decision: Decision | None = None, pending: bool = False,
                    link: Callable[[str], str] | None = None) -> str:
    """The run's Markdown description (`mlflow.note.content`); `link(artifact_path)` makes the
    plots to open first clickable."""
    parts = ["\n".join(headline_lines(h)), decision_line(h, decision, pending)]
    if inputs:
        parts.append("**Data**\n" + "\n".join(data_lines(inputs)))
    if findings:
        parts.append("**Where the model is wrong**\n" + "\n".join(f"- {f}" for f in findings))
    if highlights:
        shown = [f"[`{p}`]({link(p)})" if link else f"`{p}`" for p in highlights]
        parts.append("**Open first** (Artifacts tab): " + ", ".join(shown))
    return "\n\n".join(parts) + "\n"


def version_description(decision: Decision, h: Headline, run_link: str, run_name: str | None = None) -> str:
    """The model version's Markdown description: the decision, what it beat, the run."""
    lines = [decision.sentence(), ""]
    if h.baselines:
        lines.append("Against the baselines of the same run:")
        lines += [f"- {label} (`{key}` {fmt(v)}): {change(h.value, v, h.lower_is_better)}"
                  for label, key, v in h.baselines]
        lines.append("")
    lines.append(f"Trained in run [{run_name or 'run'}]({run_link}).")
    return "\n".join(lines) + "\n"
