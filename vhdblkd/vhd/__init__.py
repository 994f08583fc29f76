"""VHD format engine: structures, validation, geometry, block map (no I/O policy)."""

