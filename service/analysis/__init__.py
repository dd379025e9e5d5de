"""The analysis core: plan a job (`plan`), run model batches over its tiles (`inference`) into chunk files
(`chunks`), and stitch them into the outputs (`finalize`); `pipeline.analyze_slide` does all of it in one process,
the queue workers one message at a time. Uses `slide` and `outputs`; knows nothing of Redis, HTTP or settings."""
