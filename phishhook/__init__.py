"""phishhook: phished accounts found by their logins and their mail, snagged, and reviewed."""
