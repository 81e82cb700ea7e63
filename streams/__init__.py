"""streams: the record contract, topics, settings, replay producers and the impression–click join."""
