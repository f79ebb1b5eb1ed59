"""Stand-ins for AUTOMATIC1111's ``modules`` package (see ../README.md)."""
