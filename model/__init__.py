"""PixelCAM: model package."""
