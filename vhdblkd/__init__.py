"""vhdblkd: serve VHD disk images as Linux block devices over NBD."""

__version__ = "0.1.0"
