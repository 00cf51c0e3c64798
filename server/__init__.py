"""headrace server: transport, engine, model repository and the torch / TensorRT backends."""
