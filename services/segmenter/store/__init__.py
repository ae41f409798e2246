"""Tables and every SQL query of this service."""
