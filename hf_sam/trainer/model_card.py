"""What a model card says about SAM: the method, its papers, and every ``sam_*`` setting off its default.

The Trainer's card lists ``TrainingArguments``' own hyperparameters only; a card that names the optimizer and
not SAM misdescribes how the model was trained. The lines are added to the card's hyperparameter list (the
Trainer's template), or as a section of their own in a card of another template (TRL's).
"""

from __future__ import annotations

import dataclasses
import os

from ..config import SAMConfig
from ..engine.variants import lookup

# the papers of what is not a registered variant (a variant's own is declared with it: hf_sam.engine.variants)
_PAPERS = {
    "multi-step": "multi-step ascent (Kim et al., 2023, arXiv 2302.10181)",
    "adaptive": "ASAM (Kwon et al., 2021, arXiv 2102.11600)",
    "late": "SAM late in training (ICLR 2025, arXiv 2410.10373)",
}
# written on every card of a SAM run, whatever their value: they define the method
_ALWAYS = ("ascent_steps", "rho")
_HYPERPARAMETERS = "The following hyperparameters were used during training:\n"


def method_papers(config: SAMConfig) -> list[str]:
    """The method a configuration trains with, as the papers that define its parts."""
    papers = [lookup("method", config.method).paper]
    if config.method == "sam":
        if config.ascent_steps > 1:
            papers.append(_PAPERS["multi-step"])
        for kind in config.active_kinds():
            if kind != "method":
                papers.append(lookup(kind, getattr(config, kind)).paper)
    if config.adaptive:
        papers.append(_PAPERS["adaptive"])
    if config.start_step:
        papers.append(_PAPERS["late"])
    return [p for p in papers if p]


def sam_hyperparameters(config: SAMConfig) -> dict[str, object]:
    """``sam_*`` name -> value: the defining settings, and every other one that is not at its default."""
    out = {}
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if f.name in _ALWAYS or value != f.default:
            out[f"sam_{f.name}"] = value
    return out


def card_lines(config: SAMConfig) -> list[str]:
    """The card's lines: ``- name: value``, the method first."""
    lines = [f"- sam_method_papers: {'; '.join(method_papers(config))}"]
    lines += [f"- {name}: {value}" for name, value in sam_hyperparameters(config).items()]
    return lines


def add_sam_to_card(path: str | os.PathLike, config: SAMConfig) -> None:
    """Write the SAM lines into the card at ``path`` (a no-op for a run without SAM or without a card)."""
    if config.ascent_steps == 0 or not os.path.exists(path):
        return
    with open(path, encoding="utf-8") as f:
        card = f.read()
    lines = "\n".join(card_lines(config))
    if _HYPERPARAMETERS in card:
        head, tail = card.split(_HYPERPARAMETERS, 1)
        listed, blank, rest = tail.partition("\n\n")  # the Trainer's list ends at the first blank line
        card = f"{head}{_HYPERPARAMETERS}{listed.rstrip()}\n{lines}{blank}{rest}"
    else:
        card = f"{card.rstrip()}\n\n### Sharpness-Aware Minimization\n\nTrained with SAMTrainer (hf-sam):\n{lines}\n"
    with open(path, "w", encoding="utf-8") as f:
        f.write(card)
