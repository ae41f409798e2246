"""Channel providers (the only code here that talks to the outside world) and the failover router."""
