"""The bundled corpus (PSF-licensed Python documentation), shipped as package data."""
