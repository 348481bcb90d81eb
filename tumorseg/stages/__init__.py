"""The pipeline's stages, one module each: read, geometry, normalize, infer, postprocess, write, report."""
