"""The contract every service shares: records, topics, errors and the Kafka settings (see DESIGN.md)."""
