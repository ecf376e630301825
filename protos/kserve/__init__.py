"""KServe v2 / Triton `inference` protos (vendored; see README.md here) and their generated code."""
