"""pixelcam's service: slide in, class + heatmap + QuPath GeoJSON out, as a CLI and as an HTTP service.

Subpackages, in import order (each imports only those after it; docs/architecture.md has the map):
`cli` -> `api` -> `jobs` -> `analysis` -> `outputs` | `slide`. Shared by all: `errors`, `constants`,
`settings` (the shell's configuration; the core never reads it) and `lru`.
"""
