"""What an analysis writes, as pure functions of arrays and plans: the stitched heatmap (`stitching`), QuPath
GeoJSON (`geojson`, `outlines`), the slide call and evidence (`report`), Deep Zoom tiles (`deepzoom`).
Knows nothing of slide files, models, queues or HTTP."""
