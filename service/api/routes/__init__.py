"""One router per resource: slides, jobs, results, models, health (+ metrics)."""

from __future__ import annotations
