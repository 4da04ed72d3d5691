"""Bridges to other libraries; each module imports its library only when it is itself imported
(transformers: `import geomoe_kernels.integrations.transformers`)."""
