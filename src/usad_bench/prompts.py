"""Prompt vocabularies are data: YAML files a user can edit (see resources/prompts/).

A :class:`PromptSet` holds the anomaly-state phrases and sentence templates (for normal /
abnormal prompt ensembles), the words for each class label (for classifiers), and per-dataset
lesion-aware class descriptions (for UltraAD's text memory). ``load_prompts`` takes a built-in
name (``breast_ultrasound``, ``generic``) or a path to a YAML file of the same shape.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import torch
import torch.nn.functional as F
import yaml

from usad_bench.errors import UsadError

STATES = ("normal", "abnormal")


@dataclass
class PromptSet:
    name: str
    object: str  # fills "{}" in state phrases
    states: dict[str, list[str]]  # "normal" / "abnormal" -> phrases with "{}" for the object
    templates: list[str]  # sentences with "{}" for a state phrase
    class_names: dict[str, str]  # class label -> words for classifiers
    class_templates: list[str]  # sentences with "{}" for class words
    descriptions: dict[str, dict[str, list[str]]]  # dataset or "default" -> class -> sentences

    def state_prompts(self, state: str, obj: str | None = None) -> list[str]:
        """Every template filled with every phrase of ``state``."""
        phrases = [p.format(obj or self.object) for p in self.states[state]]
        return [t.format(p) for p in phrases for t in self.templates]

    def class_words(self, label: str) -> str:
        return self.class_names.get(label, label)

    def class_prompts(self, label: str) -> list[str]:
        return [t.format(self.class_words(label)) for t in self.class_templates]

    def describe(self, label: str, dataset: str) -> list[str]:
        """Lesion-aware descriptions of ``label``, the dataset's own when the file has them."""
        table = self.descriptions.get(dataset) or {}
        sentences = table.get(label) or self.descriptions.get("default", {}).get(label)
        if not sentences:
            raise UsadError(
                f"prompt file {self.name!r} has no description for class {label!r}; add it under "
                f"descriptions: default: {label}: [...] (or under descriptions: {dataset}:)"
            )
        return list(sentences)


def load_prompts(name_or_path: str) -> PromptSet:
    """A built-in vocabulary by name, or a YAML file by path."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml"):
        if not path.is_file():
            raise UsadError(f"prompt file not found: {path}")
        text, name = path.read_text(encoding="utf-8"), str(path)
    else:
        builtin = resources.files("usad_bench") / "resources" / "prompts" / f"{name_or_path}.yaml"
        if not builtin.is_file():
            raise UsadError(f"unknown prompt set {name_or_path!r}; built-ins: {', '.join(builtin_prompt_sets())}")
        text, name = builtin.read_text(encoding="utf-8"), name_or_path
    return _parse(yaml.safe_load(text), name)


def builtin_prompt_sets() -> list[str]:
    folder = resources.files("usad_bench") / "resources" / "prompts"
    return sorted(p.name.removesuffix(".yaml") for p in folder.iterdir() if p.name.endswith(".yaml"))


def _parse(data: dict, name: str) -> PromptSet:
    required = ("object", "states", "templates", "class_names", "class_templates", "descriptions")
    missing = [k for k in required if k not in (data or {})]
    if missing:
        raise UsadError(f"prompt file {name} misses keys {missing}; copy a built-in file as a starting point")
    for state in STATES:
        if not data["states"].get(state):
            raise UsadError(f"prompt file {name}: states.{state} must list at least one phrase")
    return PromptSet(
        name=name,
        object=str(data["object"]),
        states={s: list(data["states"][s]) for s in STATES},
        templates=list(data["templates"]),
        class_names={str(k): str(v) for k, v in data["class_names"].items()},
        class_templates=list(data["class_templates"]),
        descriptions={str(k): dict(v) for k, v in data["descriptions"].items()},
    )


def ensemble_embedding(text_embeddings: torch.Tensor) -> torch.Tensor:
    """CLIP's prompt-ensemble recipe: normalise each (T, D) embedding, average, normalise again."""
    return F.normalize(F.normalize(text_embeddings, dim=-1).mean(dim=0), dim=-1)
