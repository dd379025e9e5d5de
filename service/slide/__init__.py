"""Reading slides: open any supported file with its resolution (`wsi`, `metadata`), find tissue and lay tiles at
the model's physical scale (`tiling`), and decode plan tiles fast (`tile_reader`, `tiff_decode`,
`tile_reader_procs`). Knows nothing of models, outputs, queues or HTTP. Errors: `service.slide.errors`."""
