"""Real components on loopback for the end-to-end tests: Redis (plain, replicated, Sentinel), a private
Postfix instance, an SMTP sink the test controls, and policyd as a separate process."""
