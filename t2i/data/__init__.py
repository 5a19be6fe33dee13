"""Datasets: the procedural shapes world (`t2i.data.shapes`)."""

from .shapes import (
    BACKGROUND,
    PALETTE,
    POSITIONS,
    SHAPES,
    SIZES,
    ShapeObject,
    ShapeScene,
    ShapesConfig,
    ShapesDataset,
    caption_corpus,
    is_held_out,
    render_scene,
    write_image_folder,
)

__all__ = [
    "BACKGROUND", "PALETTE", "POSITIONS", "SHAPES", "SIZES", "ShapeObject", "ShapeScene", "ShapesConfig",
    "ShapesDataset", "caption_corpus", "is_held_out", "render_scene", "write_image_folder",
]
