"""Device models: specs, generators and the batch runtime."""
