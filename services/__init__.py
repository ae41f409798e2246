"""The four CLM services; each talks to the others only over Kafka."""
