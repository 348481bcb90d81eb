"""The pipeline's stages, one module each: read, register, brain, geometry, normalize, infer, decode,
postprocess, write, report, overview."""
