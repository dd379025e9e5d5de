"""PixelCAM: service package."""
