"""Terminology codes for segments whose model card has none (imported nnU-Net / MONAI models).

Slicer's terminology tables (SNOMED CT codes of the 3D Slicer General Anatomy list and the DICOM
master list) are loaded by Slicer's Terminologies module; the ``slicer-core`` wheel has the logic
but not the tables. So a label name is matched against the terminologies *loaded in this Slicer*,
through Slicer's own ``vtkSlicerTerminologiesModuleLogic``:

- names are compared case-insensitively with each type's 3D Slicer label and code meaning, and with
  ``"<modifier> <type>"`` for types with modifiers (``left kidney``);
- TotalSegmentator-style names are normalised first: underscores become spaces, a trailing side
  moves to the front (``kidney_left`` -> ``left kidney``), ``vertebrae_L1`` -> ``L1 vertebra``;
- the 3D Slicer General Anatomy list wins over other tables; no match gives the generic entry
  Slicer gives new segments (category and type *Tissue*).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import slicer
import vtk

#: preferred first: Slicer's general anatomy list, whose labels match everyday organ names.
PREFERRED_CONTEXTS = ("Segmentation category and type - 3D Slicer General Anatomy list",)
#: what Slicer gives a new segment: category and type "Tissue" (SNOMED CT 85756007).
GENERIC_ENTRY = f"{PREFERRED_CONTEXTS[0]}~SCT^85756007^Tissue~SCT^85756007^Tissue~^^~Anatomic codes - DICOM master list~^^~^^"


def name_variants(name: str) -> list[str]:
    """Lower-case spellings of a label name to look up, most specific first."""
    text = re.sub(r"\s+", " ", re.sub(r"[_\-]+", " ", name)).strip().lower()
    variants = [text]
    side = re.fullmatch(r"(.+) (left|right)", text)
    if side:
        variants.append(f"{side.group(2)} {side.group(1)}")
    vertebra = re.fullmatch(r"vertebrae? ([cthls]\d+)", text)
    if vertebra:
        variants.append(f"{vertebra.group(1)} vertebra")
    numbered = re.fullmatch(r"(.+?) \d+", text)  # an instance ("liver lesion 3") or a numbered part ("rib left 1")
    if numbered:
        variants += [v for v in name_variants(numbered.group(1)) if v not in variants]
    return variants


@dataclass
class TerminologyIndex:
    """Every type (and type + modifier) of the loaded terminologies, by lower-case name."""

    logic: object
    entries: dict[str, str] = field(default_factory=dict)

    @classmethod
    def build(cls, logic: slicer.vtkSlicerTerminologiesModuleLogic) -> TerminologyIndex:
        """Index what ``logic`` has loaded (preferred contexts win on equal names)."""
        index = cls(logic)
        names = vtk.vtkStringArray()
        logic.GetLoadedTerminologyNames(names)
        contexts = [names.GetValue(i) for i in range(names.GetNumberOfValues())]
        contexts.sort(key=lambda c: (c not in PREFERRED_CONTEXTS, c))
        for context in contexts:
            index._add_context(context)
        return index

    def _add_context(self, context: str) -> None:
        logic = self.logic
        for c in range(logic.GetNumberOfCategoriesInTerminology(context)):
            category = slicer.vtkSlicerTerminologyCategory()
            logic.GetNthCategoryInTerminology(context, c, category)
            for t in range(logic.GetNumberOfTypesInTerminologyCategory(context, category)):
                term_type = slicer.vtkSlicerTerminologyType()
                logic.GetNthTypeInTerminologyCategory(context, category, t, term_type)
                self._remember(context, category, term_type, None, [term_type.GetSlicerLabel(), term_type.GetCodeMeaning()])
                for m in range(logic.GetNumberOfTypeModifiersInTerminologyType(context, category, term_type)):
                    modifier = slicer.vtkSlicerTerminologyType()
                    logic.GetNthTypeModifierInTerminologyType(context, category, term_type, m, modifier)
                    spelled = f"{modifier.GetCodeMeaning()} {term_type.GetCodeMeaning()}"
                    self._remember(context, category, term_type, modifier, [modifier.GetSlicerLabel(), spelled])

    def _remember(self, context: str, category: object, term_type: object, modifier: object | None, keys: list) -> None:
        entry = slicer.vtkSlicerTerminologyEntry()
        entry.SetTerminologyContextName(context)
        entry.GetCategoryObject().Copy(category)
        entry.GetTypeObject().Copy(term_type)
        if modifier is not None:
            entry.GetTypeModifierObject().Copy(modifier)
        serialized = self.logic.SerializeTerminologyEntry(entry)
        for key in keys:
            if key and key.strip().lower() not in self.entries:
                self.entries[key.strip().lower()] = serialized

    def entry_for(self, name: str) -> str | None:
        """The serialized terminology entry for a label name, or None when nothing matches."""
        for variant in name_variants(name):
            if variant in self.entries:
                return self.entries[variant]
        return None

    def entry_or_default(self, name: str) -> str:
        """:meth:`entry_for`, else the generic entry Slicer gives new segments (:data:`GENERIC_ENTRY`)."""
        found = self.entry_for(name)
        return found if found is not None else GENERIC_ENTRY


def slicer_terminology_logic() -> slicer.vtkSlicerTerminologiesModuleLogic | None:
    """The running Slicer's Terminologies logic (None outside the Slicer application)."""
    modules = getattr(slicer, "modules", None)
    terminologies = getattr(modules, "terminologies", None) if modules is not None else None
    return terminologies.logic() if terminologies is not None else None
