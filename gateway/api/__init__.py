"""The HTTP API, one module per resource: images, jobs, assets, keys, health, the page."""
