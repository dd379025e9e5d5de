"""One router per resource: slides, jobs, results, models, health (+ metrics), Deep Zoom tiles, the viewer."""
