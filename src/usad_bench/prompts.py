"""Prompt vocabularies are data: YAML files a user can edit (see resources/prompts/).

A :class:`PromptSet` holds the anomaly-state phrases and sentence templates (for normal /
abnormal prompt ensembles), the words for each class label (for classifiers), and per-dataset
lesion-aware class descriptions (for UltraAD's text memory). ``load_prompts`` takes a built-in
name (``breast_ultrasound``, ``generic_ultrasound``, ``generic``) or a path to a YAML file of the
same shape. A description table may hold a ``"*"`` entry: sentences with ``{}`` for the class words,
used for any class it does not name (how ``generic_ultrasound`` serves every organ and label).

A file may instead describe each class by Ultrasound-CLIP's nine diagnostic attributes
(``attributes:`` dataset -> class -> {body_system: ..., organ: ..., ...}) plus ``attribute_sentences``
(sentences with ``{shape}``-style fields); its descriptions are then those sentences filled with each
class's attributes (see ``breast_ultrasound_attributes.yaml``), and ``PromptSet.attributes`` keeps the
table for methods that compare classes by attribute (``usclip_softlabel``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import torch
import torch.nn.functional as F
import yaml

from usad_bench.errors import UsadError

STATES = ("normal", "abnormal")
ANY_CLASS = "*"  # description key for every class a table does not name; "{}" takes the class words
PROMPT_HELP = (
    "pass --set prompts=generic_ultrasound (any organ) or --set prompts=PATH to your own YAML "
    "(copy a built-in file; docs/prompts.md)"
)


@dataclass
class PromptSet:
    name: str
    object: str  # fills "{}" in state phrases
    states: dict[str, list[str]]  # "normal" / "abnormal" -> phrases with "{}" for the object
    templates: list[str]  # sentences with "{}" for a state phrase
    class_names: dict[str, str]  # class label -> words for classifiers
    class_templates: list[str]  # sentences with "{}" for class words
    descriptions: dict[str, dict[str, list[str]]]  # dataset or "default" -> class -> sentences
    attributes: dict[str, dict[str, dict[str, str]]] = field(default_factory=dict)  # dataset -> class -> attrs

    def class_attributes(self, label: str, dataset: str = "default") -> dict[str, str] | None:
        """The diagnostic attributes of ``label`` (the dataset's own when the file has them), or None."""
        tables = [self.attributes.get(dataset) or {}, self.attributes.get("default") or {}]
        return next((dict(t[label]) for t in tables if t.get(label)), None)

    def state_prompts(self, state: str, obj: str | None = None) -> list[str]:
        """Every template filled with every phrase of ``state``."""
        phrases = [p.format(obj or self.object) for p in self.states[state]]
        return [t.format(p) for p in phrases for t in self.templates]

    def class_words(self, label: str) -> str:
        return self.class_names.get(label, label.replace("_", " "))

    def class_prompts(self, label: str) -> list[str]:
        return [t.format(self.class_words(label)) for t in self.class_templates]

    def describe(self, label: str, dataset: str) -> list[str]:
        """Lesion-aware descriptions of ``label``, the dataset's own when the file has them."""
        tables = [self.descriptions.get(dataset) or {}, self.descriptions.get("default") or {}]
        sentences = next((t[label] for t in tables if t.get(label)), None)
        if not sentences:
            generic = next((t[ANY_CLASS] for t in tables if t.get(ANY_CLASS)), None)
            if not generic:
                raise UsadError(
                    f"prompt file {self.name!r} has no description for class {label!r}; {PROMPT_HELP}, "
                    f"or add it to that file under descriptions: default: {label}: [...]"
                )
            sentences = [str(g).format(self.class_words(label)) for g in generic]
        return list(sentences)

    def missing_descriptions(self, classes: list[str], dataset: str = "default") -> list[str]:
        """The classes :meth:`describe` cannot describe (UltraAD's text memory needs every one)."""
        missing = []
        for label in classes:
            try:
                self.describe(label, dataset)
            except UsadError:
                missing.append(label)
        return missing


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
    if data and "attributes" in data and "descriptions" not in data:
        data = {**data, "descriptions": _attribute_descriptions(data, name)}
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
        attributes={str(k): {str(c): dict(a) for c, a in v.items()} for k, v in (data.get("attributes") or {}).items()},
    )


def _attribute_descriptions(data: dict, name: str) -> dict[str, dict[str, list[str]]]:
    """dataset -> class -> ``attribute_sentences`` filled with the class's attributes (``{shape}`` etc.)."""
    sentences = list(data.get("attribute_sentences") or [])
    if not sentences:
        raise UsadError(f"prompt file {name}: `attributes` needs `attribute_sentences` (sentences with {{shape}} ...)")
    out: dict[str, dict[str, list[str]]] = {}
    for dataset, classes in data["attributes"].items():
        for label, attrs in classes.items():
            try:
                out.setdefault(str(dataset), {})[str(label)] = [s.format(**attrs) for s in sentences]
            except KeyError as missing:
                raise UsadError(
                    f"prompt file {name}: attributes.{dataset}.{label} has no {missing}, which attribute_sentences use"
                ) from None
    return out


def ensemble_embedding(text_embeddings: torch.Tensor) -> torch.Tensor:
    """CLIP's prompt-ensemble recipe: normalise each (T, D) embedding, average, normalise again."""
    return F.normalize(F.normalize(text_embeddings, dim=-1).mean(dim=0), dim=-1)
