"""RMS dataset construction: prompts, output schemas, the generate-verify-regenerate loop, pipeline, finalize."""
