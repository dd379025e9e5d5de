"""PixelCAM: training package."""
