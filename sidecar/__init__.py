"""mm-sidecar: admission control for multimodal requests in front of a VLM engine."""

__version__ = "0.1.0"
