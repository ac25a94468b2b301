"""A read bundle mapped onto DeepSeg's network, ``monai_bundle`` pipeline config and card sections.

``preprocessing``, ``inferer`` and ``postprocessing`` are mapped transform by transform onto the
``monai_bundle`` pipeline (:mod:`deepseg_core.pipelines.monai_bundle`, which reproduces MONAI's
semantics exactly). Anything the mapping does not reproduce exactly (random transforms, custom
``scripts.*`` code, ``Lambdad``, label post-processing, other inferers, unsupported arguments) is
refused with ONE error that lists every such item.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ...errors import ConfigError
from ...model_card import InferenceDefaults, Inputs, LabelSpec, ModelError, Normalization
from ...nets.monai_network import MonaiNetConfig
from .card import inputs_of, labels_of, normalization_of
from .inferer import map_inferer
from .network import map_network
from .postprocessing import map_postprocessing
from .preprocessing import map_preprocessing
from .source import BundleSource
from .walker import ConfigWalker


@dataclass
class BundleMapping:
    """The DeepSeg side of a bundle, before the weights are loaded."""

    network: MonaiNetConfig
    pipeline_config: dict[str, Any]
    labels: tuple[LabelSpec, ...]
    inputs: Inputs
    normalization: Normalization
    target_spacing_xyz_mm: tuple[float, float, float]
    inference: InferenceDefaults


def map_bundle(source: BundleSource) -> BundleMapping:
    """Map a read bundle onto DeepSeg's network, pipeline and card sections.

    Raises:
        ModelError: one error listing every unsupported or unsafe item found.
    """
    from ...pipelines.monai_bundle import parse_config

    walker = ConfigWalker(source)
    steps = map_preprocessing(walker)
    inferer = map_inferer(walker)
    post = map_postprocessing(walker, steps)
    network = map_network(walker, post)
    pipeline_config: dict[str, Any] = {"steps": steps, "inferer": inferer, "postprocessing": post, "image_key": walker.image_key}
    if not walker.problems and inferer is not None and post is not None:
        try:
            parse_config(pipeline_config)
        except ConfigError as exc:
            walker.problems.append(f"pipeline: {exc.found}")
    if walker.problems or network is None or inferer is None or post is None:
        numbered = "; ".join(f"({i}) {p}" for i, p in enumerate(walker.problems, 1)) or "an incomplete inference config"
        raise ModelError(
            f"the bundle cannot be imported: {len(walker.problems)} item(s) DeepSeg does not reproduce exactly or will not run",
            subject=source.folder / source.config_file,
            expected="Orientationd / Spacingd / intensity transforms, a SlidingWindowInferer, softmax/sigmoid + Invertd + "
            "argmax, and a network_def of monai.networks.nets classes with plain arguments",
            found=numbered,
            hint="DeepSeg never evaluates bundle code ($ expressions, custom _target_s). Run such a bundle with MONAI "
            "itself (python -m monai.bundle run), or simplify its inference config.",
        )
    pipeline_config.pop("image_key")
    inputs = inputs_of(source.metadata, network, steps)
    pixdim = next((s["pixdim_xyz_mm"] for s in steps if s["op"] == "spacing"), None)
    return BundleMapping(
        network=network,
        pipeline_config=pipeline_config,
        labels=labels_of(source.metadata, network),
        inputs=inputs,
        normalization=normalization_of(steps, inputs.modality),
        target_spacing_xyz_mm=tuple(float(v) for v in pixdim) if pixdim else (1.0, 1.0, 1.0),  # type: ignore[arg-type]
        inference=InferenceDefaults(
            patch_size_zyx=tuple(inferer["roi_size_xyz"][::-1]),  # type: ignore[arg-type]
            overlap=inferer["overlap"],
            batch_size=inferer["sw_batch_size"],
        ),
    )
