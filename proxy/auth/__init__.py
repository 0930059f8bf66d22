"""Authenticate: who is calling (API key, gateway-minted JWT, or an identity provider's JWT)."""
