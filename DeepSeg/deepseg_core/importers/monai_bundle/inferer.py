"""A bundle's ``inferer``, mapped onto the pipeline's sliding-window settings.

Only ``SlidingWindowInferer`` (and its ``Adapt`` variant, whose result is the same) is reproduced,
with the arguments the pipeline's tiling, importance and padding follow exactly.
"""

from __future__ import annotations

from typing import Any

from .walker import ConfigWalker, transform_name

#: inferers whose result equals SlidingWindowInferer's (Adapt only changes devices and buffering on OOM).
SLIDING_WINDOW_INFERERS = frozenset({"SlidingWindowInferer", "SlidingWindowInfererAdapt"})
#: SlidingWindowInferer's arguments and MONAI's defaults (device and buffering ones do not change the result).
INFERER_ARGS: dict[str, Any] = {
    "roi_size": None,
    "sw_batch_size": 1,
    "overlap": 0.25,
    "mode": "constant",
    "sigma_scale": 0.125,
    "padding_mode": "constant",
    "cval": 0.0,
    "sw_device": None,
    "device": None,
    "progress": False,
    "cache_roi_weight_map": False,
    "cpu_thresh": None,
    "buffer_steps": None,
    "buffer_dim": -1,
    "with_coord": False,
}


def map_inferer(walker: ConfigWalker) -> dict[str, Any] | None:
    """The pipeline's ``inferer`` settings (``roi_size_xyz``, ``overlap``, ...), or None with problems recorded."""
    component = walker.component(walker.config.get("inferer"), "inferer")
    if component is None:
        return None
    name = transform_name(component.get("_target_"))
    if name not in SLIDING_WINDOW_INFERERS:
        walker.problem("inferer", f"{component.get('_target_')!r} (only SlidingWindowInferer is reproduced)")
        return None
    args = walker.arguments(component, name, "inferer", INFERER_ARGS)
    if args is None:
        return None
    roi = args["roi_size"]
    roi = [roi] * 3 if isinstance(roi, int) else roi
    uniform = {}
    for key in ("overlap", "sigma_scale"):
        value = args[key]
        if isinstance(value, list) and len(set(value)) == 1:
            value = value[0]
        uniform[key] = value
    checks = [
        (
            isinstance(roi, list) and len(roi) == 3 and all(isinstance(r, int) and r > 0 for r in roi),
            f"roi_size {args['roi_size']!r}",
        ),
        (isinstance(uniform["overlap"], int | float) and 0 <= uniform["overlap"] < 1, f"overlap {args['overlap']!r}"),
        (args["mode"] in ("constant", "gaussian"), f"mode {args['mode']!r}"),
        (
            isinstance(uniform["sigma_scale"], int | float) and uniform["sigma_scale"] > 0,
            f"sigma_scale {args['sigma_scale']!r}",
        ),
        (args["padding_mode"] in ("constant", "replicate", "reflect"), f"padding_mode {args['padding_mode']!r}"),
        (args["cval"] in (0, 0.0) or args["padding_mode"] != "constant", f"cval {args['cval']!r} (only 0)"),
        (not args["with_coord"], "with_coord=True"),
        (isinstance(args["sw_batch_size"], int) and args["sw_batch_size"] >= 1, f"sw_batch_size {args['sw_batch_size']!r}"),
    ]
    for ok, text in checks:
        if not ok:
            walker.problem("inferer", f"{name}: {text}")
    if not all(ok for ok, _ in checks):
        return None
    return {
        "roi_size_xyz": [int(r) for r in roi],
        "overlap": float(uniform["overlap"]),
        "mode": args["mode"],
        "sigma_scale": float(uniform["sigma_scale"]),
        "sw_batch_size": int(args["sw_batch_size"]),
        "padding_mode": args["padding_mode"],
    }
