"""phishhook: detection of phished accounts (geo-velocity, mass mail), snag actions and their review."""
