"""phishhook: phished accounts detected by geo-velocity and mass mail, snag actions, the review page."""
