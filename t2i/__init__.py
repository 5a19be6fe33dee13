"""t2i: a small text-to-image diffusion toolkit.

Heavy modules (diffusers, transformers) load on first use, so `import t2i` stays cheap.
"""

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "T2IUNet": "t2i.unet",
    "T2IPipeline": "t2i.pipeline",
    "load_pipeline": "t2i.pipeline",
    "AttentionRecorder": "t2i.attention",
    "Heatmaps": "t2i.attention",
    "GuideSettings": "t2i.settings",
    "SamplingSettings": "t2i.settings",
}


def __getattr__(name: str):
    # Lazy export; diffusers also resolves `t2i.T2IUNet` through this when loading a saved pipeline.
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 't2i' has no attribute {name!r}")


__all__ = list(_EXPORTS)
