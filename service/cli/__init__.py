"""The `pixelcam` command line: `main` (the parser), `analyze` (one slide, no server), `serve` (API + workers)."""
