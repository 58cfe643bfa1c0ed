"""Fleet simulation: many token-backed devices registering at once, and the report on them."""
