"""bonewatch: nightly monitoring and alerting for myeloma patients on bone-modifying agents."""

__version__ = "0.1.0"
__all__ = ["__version__"]
