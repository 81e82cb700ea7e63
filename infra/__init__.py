"""infra: the local Kafka broker, topic admin, and fetched assets (model, data, jars)."""
