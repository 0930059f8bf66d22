"""Edge AI gateway: authenticate, authorize, meter, route, relay, record."""

__version__ = "0.1.0"
