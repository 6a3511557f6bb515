"""The model matrix of the paper profile: which registered model, official open_clip backbone and pretrained tag each
matrix key of params.yaml stands for (``naclip_vitl14`` is NACLIP on CLIP ViT-L/14), and :func:`base_model`.

A shared fact of the lowest layer: :mod:`floss.models` (official weights) and :mod:`floss.pipeline.params` (validation,
default weights) both read it. Imports nothing (no floss module, no torch), so both may import it.
"""
from __future__ import annotations

#: matrix keys -> (registered model, the official open_clip backbone, pretrained tag) the paper profile runs;
#: ``<model>_vitl14`` is the same method on CLIP ViT-L/14 (Table 5)
MATRIX_MODELS: dict[str, tuple[str, str, str]] = {
    "maskclip": ("maskclip", "ViT-B-16", "laion2b_s34b_b88k"),
    "clipdinoiser": ("clipdinoiser", "ViT-B-16", "laion2b_s34b_b88k"),
    "naclip": ("naclip", "ViT-B-16-quickgelu", "openai"),
    "naclip_vitl14": ("naclip", "ViT-L-14-quickgelu", "openai"),
    "sclip": ("sclip", "ViT-B-16-quickgelu", "openai"),
    "sclip_vitl14": ("sclip", "ViT-L-14-quickgelu", "openai"),
    "clearclip": ("clearclip", "ViT-B-16-quickgelu", "openai"),
    "gem": ("gem", "ViT-B-16-quickgelu", "openai"),
    "gem_vitl14": ("gem", "ViT-L-14-quickgelu", "openai"),
    # beyond the paper: GEM as the paper quotes it (ClearCLIP's re-run), and two 2025 methods
    "gem_quoted": ("gem_quoted", "ViT-B-16-quickgelu", "openai"),
    "resclip": ("resclip", "ViT-B-16-quickgelu", "openai"),
    "scclip": ("scclip", "ViT-B-16-quickgelu", "openai"),
}
MODELS = tuple(MATRIX_MODELS)


def base_model(key: str) -> str:
    """The registered model behind a matrix key (``naclip_vitl14`` is NACLIP on other weights); other names pass."""
    return MATRIX_MODELS[key][0] if key in MATRIX_MODELS else key
