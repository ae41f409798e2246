"""Journey engine: Marketer-defined journeys with durable timers; emits message requests."""
