"""Dataset preparation: ingest photos into a manifest, VAE-encode them into latent shards."""
