"""The Docker stack, driven from the host: images that build offline, compose profiles, status, fidelity."""
