"""Authorize: may this principal use this model, under which limits, at what price."""
