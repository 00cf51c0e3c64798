"""The engine: dynamic batching for encoders, continuous batching for decoders."""
