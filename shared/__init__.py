"""CLM's common library: settings, topic contracts, Kafka and database plumbing, observability.

It holds contracts and plumbing only: no service's tables or business rules live here.
"""
