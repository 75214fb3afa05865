"""The gRPC process: config, app, servicers, engine, batch, sampling, stopping, metrics, errors."""
