"""The fleet engine: workers that run shards of devices against real brokers."""
