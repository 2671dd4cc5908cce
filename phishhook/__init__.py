"""phishhook: phished accounts found by their logins (geo-velocity) and their mail (mass mail), snagged,
and reviewed by the security team."""
