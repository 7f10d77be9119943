"""iotix: simulate IoT devices, from one to hundreds of thousands, to test IoT back ends."""

__version__ = "0.1.0"

__all__ = ["__version__"]
